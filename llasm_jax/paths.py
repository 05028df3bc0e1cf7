"""Paths that are local folders or object-store URLs (`gs://bucket/run`), through etils.epath.

On a TPU pod every worker writes checkpoints, model folders and run files to one bucket, so no
path may go through `os.path` (`os.path.abspath("gs://b/run")` is a local folder named `gs:`).
Local paths are made absolute, URLs are kept as they are.

Object stores have no atomic rename. A folder there is committed by writing its marker file
last (a model folder's `llasm_jax.json`, a dataset's `dataset_info.json`); readers treat a folder
without its marker as incomplete. Local writes stay atomic through a temporary name and a rename.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator

from etils import epath

from llasm_jax.errors import UserError

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """Whether `path` is an object-store URL (gs://, s3://, ...) rather than a local path."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """`path` as an epath.Path: local paths absolute (every process agrees on them), URLs as given."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(os.path.expanduser(text)))


def join(path: PathLike, *parts: str) -> str:
  """`path/part/...` as a string (what Orbax, tensorboardX and error messages take)."""
  return os.fspath(resolve(path).joinpath(*parts))


def require_local(path: PathLike, what: str, fix: str) -> str:
  """`path` if it is local, else a named error: some readers (ArrayRecord, tokenizers) need files."""
  if is_remote(path):
    raise UserError(f"{what} {os.fspath(path)!r} is an object-store URL, which it cannot read; {fix}")
  return os.fspath(path)


def write_text(path: PathLike, text: str) -> None:
  """Writes the whole file at once: locally through a temporary file and a rename, on an object
  store as one upload (an object appears whole or not at all)."""
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


def append_text(path: PathLike, text: str) -> None:
  """Appends to a file; object stores cannot append, so there the object is written again."""
  path = resolve(path)
  if is_remote(path):
    write_text(path, (path.read_text() if path.exists() else "") + text)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("a") as f:
    f.write(text)


def write_json(path: PathLike, value: Any, **dump_kw) -> None:
  write_text(path, json.dumps(value, **{"indent": 2, **dump_kw}))


def read_json(path: PathLike) -> Any:
  return json.loads(resolve(path).read_text())


def copy_files(src: PathLike, dst: PathLike, names: Iterable[str]) -> None:
  """Copies the files of `names` that `src` has and `dst` lacks (each side local or remote)."""
  src, dst = resolve(src), resolve(dst)
  for name in names:
    if (src / name).exists() and not (dst / name).exists():
      dst.mkdir(parents=True, exist_ok=True)
      (src / name).copy(dst / name)


def rmtree(path: PathLike) -> None:
  path = resolve(path)
  if path.exists():
    path.rmtree()


def upload_tree(local: PathLike, remote: PathLike, *, last: Iterable[str] = ()) -> None:
  """Copies the folder `local` to `remote` file by file, the files named in `last` (markers,
  relative paths) after all the others, so that a reader never sees a marked, partial folder."""
  local, remote = os.fspath(require_local(local, "upload source", "pass a local folder")), resolve(remote)
  last = set(last)
  files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, names in os.walk(local) for f in names)
  for rel in sorted(files, key=lambda rel: rel in last):
    target = remote / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    epath.Path(local, rel).copy(target, overwrite=True)


@contextlib.contextmanager
def staged(out: PathLike, *, last: Iterable[str] = ()) -> Iterator[str]:
  """A local folder to write `out` into with libraries that only write local files (TFDS's
  ArrayRecord writer, transformers' save_pretrained): `out` itself when it is local, else a
  temporary folder uploaded to `out` (its `last` files after the rest) when the block completes."""
  if not is_remote(out):
    yield os.fspath(resolve(out))
    return
  tmp = tempfile.mkdtemp(prefix="llasm_jax_stage_")
  try:
    yield tmp
    upload_tree(tmp, out, last=last)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


_DOWNLOADS: dict[tuple[str, tuple[str, ...]], str] = {}


def local_copy(folder: PathLike, names: Iterable[str]) -> str:
  """A local folder with the files of `names` (relative paths) that `folder` holds: `folder`
  itself when local, else a per-process download (tokenizers and JSON readers want local files;
  the big arrays are read from the bucket directly by Orbax)."""
  if not is_remote(folder):
    return os.fspath(resolve(folder))
  names = tuple(names)
  key = (os.fspath(folder), names)
  if key not in _DOWNLOADS:
    tmp = tempfile.mkdtemp(prefix="llasm_jax_remote_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    src = resolve(folder)
    for name in names:
      if (src / name).exists():
        target = epath.Path(tmp) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (src / name).copy(target)
    _DOWNLOADS[key] = tmp
  return _DOWNLOADS[key]
