"""Finding the tokenizer for an export and writing it into the model folder as tokenizer.json.

Sources, first match wins: --tokenizer PATH; the checkpoint folder; the hub's `gpt2` tokenizer
(shared by the whole GPT-2 family). A folder with only vocab.json + merges.txt gets a
tokenizer.json built from them, so the engine needs just one format.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from gpt2onnx.engine.contract import TOKENIZER_FILE, GPT2Config

from .checkpoint import TOKENIZER_FILES, CheckpointError

log = logging.getLogger(__name__)
ENDOFTEXT = "<|endoftext|>"


def find_tokenizer(explicit: Path | None, checkpoint_folder: Path | None, hub_fallback: str | None) -> Path:
    """A folder holding tokenizer.json or vocab.json + merges.txt, or a tokenizer.json file."""
    if explicit is not None:
        if not explicit.exists():
            raise CheckpointError(f"--tokenizer {explicit} does not exist; pass a folder with tokenizer.json (or vocab.json + merges.txt)")
        if explicit.is_file() or _has_tokenizer(explicit):
            return explicit
        raise CheckpointError(f"--tokenizer {explicit} holds neither tokenizer.json nor vocab.json + merges.txt")
    if checkpoint_folder is not None and _has_tokenizer(checkpoint_folder):
        return checkpoint_folder
    if hub_fallback is not None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(hub_fallback, allow_patterns=list(TOKENIZER_FILES)))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
            log.debug("no hub tokenizer for %s", hub_fallback, exc_info=True)
    raise CheckpointError(
        "no tokenizer found beside the weights and none could be downloaded; pass --tokenizer PATH "
        "(a folder with tokenizer.json, or vocab.json + merges.txt, such as a GPT-2 model folder)"
    )


def write_tokenizer(source: Path, out_dir: Path, config: GPT2Config) -> None:
    """Copy (or build) tokenizer.json and the other tokenizer files into out_dir, checking the vocabulary."""
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
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {size} tokens but the model's vocabulary has {config.vocab_size}; pass the tokenizer that belongs to these weights with --tokenizer")
    for name, path in files.items():
        shutil.copyfile(path, out_dir / name)
    if TOKENIZER_FILE not in files:
        tokenizer.save(str(out_dir / TOKENIZER_FILE))


def _has_tokenizer(folder: Path) -> bool:
    return (folder / TOKENIZER_FILE).is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


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
