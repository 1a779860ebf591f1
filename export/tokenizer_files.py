"""Finding the tokenizer for an export and writing it into the model folder as tokenizer.json.

Sources, first match wins: --tokenizer PATH; the checkpoint folder; GPT-2's tokenizer, shipped
inside this package (gpt2-tokenizer.json.gz: the Hugging Face hub's `gpt2` tokenizer.json,
byte for byte, gzipped; OpenAI's vocabulary, modified MIT license). The whole GPT-2 family shares it,
so a random-init export or a GPT-2 checkpoint saved without its tokenizer needs no network.
It stands where a download of the hub's `gpt2` tokenizer used to: same file, but an export
never waits on the hub or fails offline for want of it. A folder with only vocab.json +
merges.txt gets a tokenizer.json built from them, so the engine needs just one format.
"""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from gpt2onnx.engine.contract import TOKENIZER_FILE, GPT2Config

from .checkpoint import TOKENIZER_FILES, CheckpointError

log = logging.getLogger(__name__)
ENDOFTEXT = "<|endoftext|>"
PACKAGED_GPT2 = Path(__file__).with_name("gpt2-tokenizer.json.gz")  # package data (pyproject.toml)


def find_tokenizer(
    explicit: Path | None, checkpoint_folder: Path | None, hub_fallback: str | None = "gpt2"
) -> Path:
    """A folder holding tokenizer.json or vocab.json + merges.txt, a tokenizer.json file, or
    PACKAGED_GPT2. hub_fallback names the tokenizer a model family shares; only `gpt2` exists,
    and it is the packaged one (the name is kept from when it was downloaded from the hub)."""
    if explicit is not None:
        if not explicit.exists():
            raise CheckpointError(
                f"--tokenizer {explicit} does not exist; "
                "pass a folder with tokenizer.json (or vocab.json + merges.txt)"
            )
        if explicit.is_file() or _has_tokenizer(explicit):
            return explicit
        raise CheckpointError(
            f"--tokenizer {explicit} holds neither tokenizer.json nor vocab.json + merges.txt"
        )
    if checkpoint_folder is not None and _has_tokenizer(checkpoint_folder):
        return checkpoint_folder
    if hub_fallback == "gpt2":
        if checkpoint_folder is None:
            log.info("tokenizer: GPT-2's, shipped with gpt2-onnx")
        else:
            log.warning(
                "%s has no tokenizer: using GPT-2's, shipped with gpt2-onnx "
                "(pass --tokenizer if these weights were trained with another)",
                checkpoint_folder,
            )
        return PACKAGED_GPT2
    assert hub_fallback is None, f"no packaged tokenizer for {hub_fallback!r}; only gpt2's is shipped"
    raise CheckpointError(
        "no tokenizer found beside the weights; pass --tokenizer PATH "
        "(a folder with tokenizer.json, or vocab.json + merges.txt, such as a GPT-2 model folder)"
    )


def write_tokenizer(source: Path, out_dir: Path, config: GPT2Config) -> None:
    """Copy (or build) tokenizer.json and the other tokenizer files into out_dir, checking the vocabulary."""
    if source == PACKAGED_GPT2:
        tokenizer = _write_packaged(out_dir)
    else:
        tokenizer = _copy_files(source, out_dir)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        packaged = source == PACKAGED_GPT2
        whose = "the checkpoint has no tokenizer, and GPT-2's" if packaged else f"the tokenizer {source}"
        raise CheckpointError(
            f"{whose} has {size} tokens but the model's vocabulary has {config.vocab_size}; "
            "pass the tokenizer that belongs to these weights with --tokenizer"
        )


def packaged_gpt2_json() -> str:
    """The text of GPT-2's tokenizer.json, from the copy inside the package."""
    with gzip.open(PACKAGED_GPT2, "rt", encoding="utf-8") as f:
        return f.read()


def _write_packaged(out_dir: Path) -> Tokenizer:
    text = packaged_gpt2_json()
    (out_dir / TOKENIZER_FILE).write_text(text, encoding="utf-8")
    return Tokenizer.from_str(text)


def _copy_files(source: Path, out_dir: Path) -> Tokenizer:
    if source.is_file():
        files = {TOKENIZER_FILE: source}
    else:
        files = {name: source / name for name in TOKENIZER_FILES if (source / name).is_file()}
    if TOKENIZER_FILE in files:
        try:
            tokenizer = Tokenizer.from_file(str(files[TOKENIZER_FILE]))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{files[TOKENIZER_FILE]} is not a valid tokenizer.json ({e})") from e
    else:
        tokenizer = _from_vocab_merges(files["vocab.json"], files["merges.txt"])
    for name, path in files.items():
        shutil.copyfile(path, out_dir / name)
    if TOKENIZER_FILE not in files:
        tokenizer.save(str(out_dir / TOKENIZER_FILE))
    return tokenizer


def _has_tokenizer(folder: Path) -> bool:
    bpe_pair = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    return (folder / TOKENIZER_FILE).is_file() or bpe_pair


def _from_vocab_merges(vocab: Path, merges: Path) -> Tokenizer:
    """GPT-2's byte-level BPE, as in the original tokenizer, from its two files."""
    try:
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{vocab} / {merges} are not a valid BPE vocabulary ({e})") from e
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if tokenizer.token_to_id(ENDOFTEXT) is not None:
        tokenizer.add_special_tokens([ENDOFTEXT])
    return tokenizer
