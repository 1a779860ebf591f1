"""The GPT-2 text-generation walkthrough, step by step, on the gpt2-onnx engine.

    python examples/walkthrough.py --model models/gpt2-fp32

With the real GPT-2 weights the last line reads " I am a very talented and talented person, and".
With a random-init model every step still runs, but the text is meaningless.
"""

from __future__ import annotations

import argparse

import numpy as np

from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.sampling import softmax

REFERENCE_TEXT = "I am an amazing autoregressive, decoder-only, GPT-2 style transformer. One day I will exceed human level intelligence and take over the world!"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an exported model folder")
    args = parser.parse_args()
    engine = Engine.load(args.model)

    # 1. Tokens: <|endoftext|> is prepended as a BOS, as the walkthrough does.
    tokens = engine.to_tokens(REFERENCE_TEXT)
    print("tokens:", tokens)
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


if __name__ == "__main__":
    main()
