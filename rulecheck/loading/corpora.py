"""Corpora: ``load_corpus`` turns a corpus spec into token ids ``[n_seq, seq_len]``, BOS first.

Corpus specs: ``.npy`` token ids ``[n_seq, seq_len]`` with BOS in column 0, ``.txt`` (one
document a line), ``.jsonl`` (``{"text": ...}`` a line) or a Hugging Face dataset name.
"""

from __future__ import annotations

import json
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rulecheck.errors import InvalidSpec
from rulecheck.files import file_kind
from rulecheck.loading._common import (
    INT64_MAX,
    expand_path,
    json_text,
    looks_like_path,
    one_line,
)

STREAMED_SEQUENCES = 1024


def load_corpus(
    spec: str,
    *,
    tokenizer: Any = None,
    bos_token_id: int | None = None,
    seq_len: int = 64,
    d_vocab: int | None = None,
    max_sequences: int | None = None,
) -> torch.Tensor:
    """Token ids ``[n_seq, seq_len]`` (int64, BOS in column 0) from a corpus spec.

    Rows of a ``.npy`` file longer than ``seq_len`` are cut to their first ``seq_len`` tokens
    (shorter rows are kept as they are); text is tokenized without BOS, cut into
    chunks of ``seq_len - 1`` tokens within each document (a shorter tail is dropped), and BOS
    is put in front. A streamed dataset stops at ``max_sequences`` (default 1024).
    """
    if seq_len < 2:
        raise InvalidSpec(
            f"seq_len={seq_len} leaves no room after BOS",
            file=spec,
            field="seq_len",
            fix="use seq_len >= 2",
        )
    path = expand_path(spec)
    suffix = path.suffix.lower()
    looks_like_file = looks_like_path(spec) or suffix in (".npy", ".txt", ".jsonl") or path.exists()
    if path.is_dir():
        raise InvalidSpec(
            "is a directory, not a corpus file",
            file=path,
            fix="pass a .npy, .txt or .jsonl file inside it, or a dataset name",
        )
    if looks_like_file and not path.is_file():
        kind = file_kind(path)  # a FIFO or device is streamed from forever, or blocks
        raise InvalidSpec(
            "file not found" if kind is None else f"is {kind}, not a regular file",
            file=path,
            fix="pass a .npy, .txt or .jsonl file or a dataset name",
        )
    if suffix == ".npy":
        tokens = _npy_tokens(path, bos_token_id=bos_token_id)[:, :seq_len]
        where: Path | str = path
    else:
        bos = _bos_id(tokenizer, bos_token_id, spec=spec)
        if suffix in (".txt", ".jsonl"):
            documents = _file_documents(path)
        elif looks_like_file:
            raise InvalidSpec(
                f"unknown corpus format {suffix or '(no suffix)'}",
                file=path,
                fix="use .npy (token ids), .txt (one document a line) or .jsonl",
            )
        else:
            documents = _dataset_documents(spec)
            max_sequences = STREAMED_SEQUENCES if max_sequences is None else max_sequences
        tokens = _chunk_documents(documents, tokenizer, bos, seq_len, max_sequences, spec=spec)
        where = path if looks_like_file else spec
    if max_sequences is not None:
        tokens = tokens[:max_sequences]
    _check_tokens(tokens, where=where, d_vocab=d_vocab)
    return tokens


# what numpy raises for a .npy file it cannot read (TokenError: its parser of Python 2 headers;
# TypeError: a header dict with a bytes key; SyntaxError: a descr such as ",i8")
NPY_ERRORS = (OSError, ValueError, EOFError, TypeError, SyntaxError, tokenize.TokenError)
# what numpy's public functions can read of a .npy header; other versions are left to np.load
NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _check_npy_dtype(dtype: np.dtype, *, path: Path) -> None:
    if dtype.kind not in "iu":
        raise InvalidSpec(
            f"expected integer token ids, found dtype {dtype}",
            file=path,
            field="dtype",
            fix="save token ids as an integer array, e.g. array.astype(np.int64)",
        )


def _npy_header_dtype(path: Path) -> np.dtype | None:
    """The dtype a .npy header declares, read without the data; None if it cannot be read here."""
    try:
        with path.open("rb") as file:
            reader = NPY_HEADER_READERS.get(np.lib.format.read_magic(file))
            return None if reader is None else reader(file)[2]
    except NPY_ERRORS:
        return None


def _npy_tokens(path: Path, *, bos_token_id: int | None) -> torch.Tensor:
    """Token ids of a .npy file, its dtype checked from the header before the data is read, the
    data memory-mapped so that a header promising more than the file holds fails cleanly."""
    header_dtype = _npy_header_dtype(path)
    if header_dtype is not None:
        _check_npy_dtype(header_dtype, path=path)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except NPY_ERRORS as exc:
        raise InvalidSpec(
            f"not a readable .npy file ({one_line(exc)})",
            file=path,
            fix="save an integer array with numpy.save",
        ) from None
    if not isinstance(array, np.ndarray):
        array.close()  # an NpzFile holds the file open
        raise InvalidSpec(
            "a .npz archive, not a .npy array",
            file=path,
            fix="save one integer array with numpy.save",
        )
    _check_npy_dtype(array.dtype, path=path)
    if array.ndim != 2:
        raise InvalidSpec(
            f"expected shape [n_seq, seq_len], found {list(array.shape)}",
            file=path,
            field="shape",
            fix="save a 2-d array, one sequence a row",
        )
    if array.dtype.kind == "u" and array.size and int(array.max()) > INT64_MAX:
        row, column = (int(i) for i in np.argwhere(array > INT64_MAX)[0])
        raise InvalidSpec(
            f"found token id {int(array[row, column])} (row {row}, column {column}),"
            " too large for int64",
            file=path,
            field="token ids",
            fix="tokenize the corpus with the model's tokenizer",
        )
    tokens = torch.from_numpy(np.array(array, dtype=np.int64))
    _check_bos(tokens, bos_token_id, where=path)
    return tokens


def _check_bos(tokens: torch.Tensor, bos_token_id: int | None, *, where: Path | str) -> None:
    if bos_token_id is not None and tokens.shape[1] > 0:
        bad = (tokens[:, 0] != bos_token_id).nonzero()
        if len(bad):
            row = int(bad[0, 0])
            raise InvalidSpec(
                f"row {row} starts with {int(tokens[row, 0])}, not BOS {bos_token_id}"
                f" ({len(bad)} of {tokens.shape[0]} rows)",
                file=where,
                field="column 0",
                fix="put the BOS token id in column 0 of every row",
            )


def tokens_of(
    tokens: Any,
    *,
    where: str = "tokens",
    bos_token_id: int | None = None,
    seq_len: int = 64,
    d_vocab: int | None = None,
) -> torch.Tensor:
    """Token ids given in memory (a tensor or array ``[batch, pos]``, BOS in column 0) read as
    a ``.npy`` file of them is: integers, 2-d, BOS first, rows cut to ``seq_len``, ids in the
    vocabulary; ``InvalidSpec`` about ``where`` otherwise."""
    fix = "pass token ids [batch, pos] as model.to_tokens gives them (BOS in column 0)"
    array = tokens.detach().cpu() if isinstance(tokens, torch.Tensor) else torch.as_tensor(tokens)
    if array.is_floating_point() or array.is_complex() or array.dtype == torch.bool:
        raise InvalidSpec(f"expected integer token ids, found {array.dtype}", file=where, fix=fix)
    if array.dim() != 2:
        raise InvalidSpec(
            f"expected shape [batch, pos], found {list(array.shape)}",
            file=where,
            field="shape",
            fix=fix,
        )
    out = array.to(torch.int64)[:, :seq_len].contiguous()
    _check_bos(out, bos_token_id, where=where)
    _check_tokens(out, where=where, d_vocab=d_vocab)
    return out


def _bos_id(tokenizer: Any, bos_token_id: int | None, *, spec: str) -> int:
    if tokenizer is None:
        raise InvalidSpec(
            "a text corpus needs a tokenizer",
            file=spec,
            field="tokenizer",
            fix="load a model with a tokenizer, or pass a .npy file of token ids",
        )
    bos = bos_token_id if bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise InvalidSpec(
            "the tokenizer has no BOS token",
            file=spec,
            field="bos_token_id",
            fix="pass bos_token_id",
        )
    return int(bos)


def _not_utf8(path: Path) -> InvalidSpec:
    """The error for a text file that is not UTF-8: the first bad byte, its offset and line."""
    offset = 0
    with path.open("rb") as lines:  # no UTF-8 sequence holds a newline byte
        for number, raw in enumerate(lines, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return InvalidSpec(
                    f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte offset {offset + exc.start}",
                    file=path,
                    line=number,
                    fix="save the file as UTF-8 (e.g. iconv -t UTF-8)",
                )
            offset += len(raw)
    return InvalidSpec("not UTF-8", file=path, fix="save the file as UTF-8")


def _file_documents(path: Path) -> Iterator[str]:
    try:
        yield from _file_lines(path)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _file_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if path.suffix.lower() != ".jsonl":
                yield line.rstrip("\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidSpec(
                    f"not JSON ({one_line(exc)})",
                    file=path,
                    line=number,
                    fix='write one {"text": ...} object a line',
                ) from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise InvalidSpec(
                    "expected an object with a string field text",
                    file=path,
                    line=number,
                    field="text",
                    fix='write one {"text": ...} object a line',
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a \ud800 escape: JSON reads it, UTF-8 cannot
                raise InvalidSpec(
                    f"holds {json_text(text[exc.start])}, half a surrogate pair, not a character",
                    file=path,
                    line=number,
                    field="text",
                    fix="escape characters outside the BMP as a full pair, or write them as UTF-8",
                ) from None
            yield text


def _dataset_documents(name: str) -> Iterator[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as exc:
        raise InvalidSpec(
            f"cannot load the dataset from the Hugging Face hub ({one_line(exc, 120)})",
            file=name,
            fix="pass a local .npy, .txt or .jsonl file",
        ) from None
    rows = iter(dataset)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:
            raise InvalidSpec(
                f"cannot read the dataset ({one_line(exc, 120)})",
                file=name,
                fix="pass a local .npy, .txt or .jsonl file",
            ) from None
        text = row.get("text")
        if not isinstance(text, str):
            raise InvalidSpec(
                "dataset rows have no string field text",
                file=name,
                field="text",
                fix="use a dataset with a text column, or a local file",
            )
        yield text


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _chunk_documents(
    documents: Iterable[str],
    tokenizer: Any,
    bos: int,
    seq_len: int,
    max_sequences: int | None,
    *,
    spec: str,
) -> torch.Tensor:
    body = seq_len - 1
    rows: list[list[int]] = []
    for batch in _batched(documents, 256):
        for ids in _encode(tokenizer, batch):
            for start in range(0, len(ids) - body + 1, body):
                rows.append([bos, *ids[start : start + body]])
        if max_sequences is not None and len(rows) >= max_sequences:
            break
    if not rows:
        raise InvalidSpec(
            f"no document is at least {body} tokens long",
            file=spec,
            field="seq_len",
            fix="use a smaller seq_len or longer documents",
        )
    return torch.tensor(rows, dtype=torch.int64)


def _check_tokens(tokens: torch.Tensor, *, where: Path | str, d_vocab: int | None) -> None:
    if tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise InvalidSpec(
            f"expected at least one sequence of 2+ tokens, found shape {list(tokens.shape)}",
            file=where,
            field="shape",
            fix="provide sequences of BOS plus at least one token",
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or (d_vocab is not None and high >= d_vocab):
        bad = low if low < 0 else high
        allowed = "non-negative" if d_vocab is None else f"in 0..{d_vocab - 1} (d_vocab={d_vocab})"
        raise InvalidSpec(
            f"found token id {bad}, expected ids {allowed}",
            file=where,
            field="token ids",
            fix="tokenize the corpus with the model's tokenizer",
        )
