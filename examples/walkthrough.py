"""The GPT-2 text-generation walkthrough, step by step, on the gpt2-onnx engine.

    gpt2-onnx export --model gpt2 --inspect --output models/gpt2-fp32   # offline: --random-init gpt2
    python examples/walkthrough.py --model models/gpt2-fp32 [--picture attention.png]

The last step, `run_with_cache`, needs a folder exported with --inspect; the picture of an
attention pattern needs matplotlib (pip install matplotlib).

With the real GPT-2 weights the last line reads " I am a very talented and talented person, and".
With a random-init model every step still runs, but the text is meaningless.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from gpt2onnx.engine.activations import canonical_names
from gpt2onnx.engine.contract import ModelFolderError
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.sampling import softmax

REFERENCE_TEXT = "I am an amazing autoregressive, decoder-only, GPT-2 style transformer. One day I will exceed human level intelligence and take over the world!"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an exported model folder (with --inspect)")
    parser.add_argument("--picture", default="attention.png", help="where to draw an attention pattern")
    parser.add_argument("--layer", type=int, default=0, help="the pattern's layer")
    parser.add_argument("--head", type=int, default=0, help="the pattern's head")
    args = parser.parse_args()
    engine = Engine.load(args.model)

    # 1. Tokens: <|endoftext|> is prepended as a BOS, as the walkthrough does: (batch, seq) = (1, 35).
    tokens = np.array([engine.to_tokens(REFERENCE_TEXT)])
    print("tokens:", tokens)
    print("tokens shape:", tokens.shape)
    print("str tokens:", engine.to_str_tokens(REFERENCE_TEXT))

    # 2. Logits for every position: (batch, seq, vocab) = (1, 35, 50257) for GPT-2.
    logits = engine.logits(tokens)
    print("logits shape:", logits.shape)

    # 3. Softmax turns the logits into a distribution over the next token at each position.
    probs = softmax(logits[0].astype(np.float64))
    print("probabilities sum to 1 at each position:", np.allclose(probs.sum(-1), 1.0))

    # 4. The most likely next token after the whole text is the argmax of the last position.
    next_token = int(logits[0, -1].argmax())
    print("next token:", next_token, repr(engine.to_string([next_token])))

    # 5. A 10-token greedy continuation through the KV cache.
    completion = engine.generate(REFERENCE_TEXT, max_new_tokens=10).completions[0]
    print("continuation ids:", completion.token_ids)
    print("continuation:", repr(completion.text))
    if engine.manifest.source.random_init:
        print("(this model has RANDOM weights: the text is meaningless)")

    # 6. Every activation of the forward pass, under TransformerLens's names and shapes.
    try:
        logits, cache = engine.run_with_cache(tokens)
    except ModelFolderError as e:
        sys.exit(f"run_with_cache: {e}")
    print("run_with_cache logits shape:", logits.shape)
    print(f"{len(cache)} activations; TransformerLens's canonical names, layer 0 (the others are alike):")
    for name in canonical_names(engine.manifest.config.n_layer):
        if ".0." in name or "blocks" not in name:
            print(f"  {name:32} {cache[name].shape}")
    pattern = cache["pattern", args.layer][0, args.head]  # (query, key): how much each token looks back
    print(f"layer {args.layer} head {args.head}: each token's most attended earlier token:",
          [int(i) for i in pattern.argmax(-1)])  # fmt: skip
    draw_pattern(pattern, engine.to_str_tokens(tokens[0].tolist()), args.picture, args.layer, args.head)


def draw_pattern(pattern: np.ndarray, str_tokens: list[str], path: str, layer: int, head: int) -> None:
    """A heatmap of one head's attention pattern, tokens on both axes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib to draw the attention pattern)")
        return
    n = len(str_tokens)
    fig, ax = plt.subplots(figsize=(3 + n * 0.28, 2.5 + n * 0.28))
    image = ax.imshow(pattern, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [repr(t)[1:-1] for t in str_tokens]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("key (the token attended to)")
    ax.set_ylabel("query (the token attending)")
    ax.set_title(f"attention pattern, layer {layer} head {head}")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print("attention pattern drawn in", path)


if __name__ == "__main__":
    main()
