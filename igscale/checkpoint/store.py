"""Checkpoints: write to local staging, upload through igscale.storage, then (and only then) move `latest`.

Layout under the checkpoint URL:
    step_000001000/<files of every rank>     DeepSpeed state (mp_rank_*, zero_pp_rank_*), trainer_rank*.pt, ...
    step_000001000/_ranks/00000.json         one marker per rank, written after that rank's files are uploaded
    step_000001000/COMPLETE                  written by rank 0 once all rank markers exist (json metadata)
    latest                                   text: the tag of the newest COMPLETE checkpoint; written last
A save that dies part-way leaves `latest` on the previous complete checkpoint. Retention (rank 0, after a save
succeeded) keeps the last `keep_last` complete checkpoints plus every step that is a multiple of `keep_every`,
and removes incomplete leftovers older than `latest`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable

from igscale.distributed.collectives import all_ok
from igscale.distributed.env import barrier
from igscale.storage import Storage, open_storage

__all__ = ["Checkpointer", "CheckpointError", "tag_for", "step_of", "check_tag"]

LATEST = "latest"
COMPLETE = "COMPLETE"


_TAG = re.compile(r"step_\d{9,}")


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded: a malformed `latest`, a missing rank file, a key outside the tag."""


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


def step_of(tag: str) -> int:
    return int(tag.split("_", 1)[1])


def check_tag(tag: str, where: str) -> str:
    """`tag` if it has this module's own format; anything else (an absolute path, `..`) is refused."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise CheckpointError(f"{where}: {tag!r} is not a checkpoint tag (step_ + 9 digits); refusing to use it")
    return tag


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _inside(root: str, rel: str) -> str:
    """root/rel, refusing relative paths that are absolute or climb out of root (keys come from storage)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        raise CheckpointError(f"refusing the stored key {rel!r}: it would leave {root}")
    return os.path.join(root, *parts)


def _fault_kill(step: int, uploaded: int) -> None:
    """Fault injection for tests: IGSCALE_FAULT_UPLOAD_KILL="<step>:<n>" SIGKILLs this process after n uploads."""
    spec = os.environ.get("IGSCALE_FAULT_UPLOAD_KILL")
    if spec:
        s, n = (int(v) for v in spec.split(":"))
        if s == step and uploaded >= n:
            os.kill(os.getpid(), signal.SIGKILL)


class Checkpointer:
    def __init__(self, url: str, staging_dir: str, *, rank: int = 0, world_size: int = 1, keep_last: int = 2,
                 keep_every: int = 0, endpoint_url: str | None = None):
        self.storage: Storage = open_storage(url, endpoint_url=endpoint_url)
        self.url = url
        self.rank, self.world_size = rank, world_size
        self.keep_last, self.keep_every = keep_last, keep_every
        # Each rank stages in its own folder, so ranks sharing a node never upload each other's files.
        self.staging = os.path.join(staging_dir, f"rank{rank:05d}")
        os.makedirs(self.staging, exist_ok=True)

    # -- save ----------------------------------------------------------------------------------------------
    def save(self, step: int, write: Callable[[str, str], None], meta: dict | None = None) -> str:
        """Collective: every rank calls it. `write(staging_dir, tag)` writes this rank's files into staging_dir/tag."""
        tag = tag_for(step)
        local = os.path.join(self.staging, tag)
        shutil.rmtree(local, ignore_errors=True)
        write(self.staging, tag)
        files = sorted(
            os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs
        )
        ok = 1
        err: BaseException | None = None
        try:
            for i, rel in enumerate(files, 1):
                self.storage.put_file(f"{tag}/{rel}", os.path.join(local, rel))
                _fault_kill(step, i)
            sizes = {rel: os.path.getsize(os.path.join(local, rel)) for rel in files}
            sums = {rel: _sha256(os.path.join(local, rel)) for rel in files}
            self.storage.put_text(f"{tag}/_ranks/{self.rank:05d}.json",
                                  json.dumps({"files": files, "sizes": sizes, "sha256": sums}))
        except Exception as e:  # keep going to the collective so other ranks do not hang
            ok, err = 0, e
        if not all_ok(bool(ok)):
            raise RuntimeError(f"checkpoint {tag}: upload failed on some rank; `latest` left unchanged") from err
        if self.rank == 0:
            markers = [k for k in self.storage.list(f"{tag}/_ranks/") if k.endswith(".json")]
            if len(markers) != self.world_size:
                raise RuntimeError(f"checkpoint {tag}: {len(markers)} of {self.world_size} rank markers present")
            info = dict(meta or {}, step=step, tag=tag, world_size=self.world_size, time=time.time())
            self.storage.put_text(f"{tag}/{COMPLETE}", json.dumps(info))
            self.storage.put_text(LATEST, tag)  # the commit point
            self._retention(tag)
        barrier()
        shutil.rmtree(local, ignore_errors=True)
        return tag

    def _tags(self) -> list[str]:
        tags = {k.split("/", 1)[0] for k in self.storage.list("step_")}
        return sorted(t for t in tags if t.startswith("step_") and t[5:].isdigit())

    def _retention(self, latest: str) -> None:
        tags = self._tags()
        complete = [t for t in tags if self.storage.exists(f"{t}/{COMPLETE}")]
        keep = set(complete[-self.keep_last:]) | {latest}
        if self.keep_every:
            keep |= {t for t in complete if step_of(t) % self.keep_every == 0}
        for t in tags:
            # Incomplete tags newer than `latest` may belong to nothing yet; older ones are dead leftovers.
            if t not in keep and (t in complete or step_of(t) < step_of(latest)):
                for k in self.storage.list(f"{t}/"):
                    self.storage.delete(k)

    # -- load ----------------------------------------------------------------------------------------------
    def latest_tag(self) -> str | None:
        if not self.storage.exists(LATEST):
            return None
        tag = check_tag(self.storage.get_text(LATEST).strip(), f"`latest` in {self.url}")
        if not self.storage.exists(f"{tag}/{COMPLETE}"):
            raise RuntimeError(f"`latest` in {self.url} points at {tag}, which is not a complete checkpoint")
        return tag

    def latest_is(self, step: int) -> bool:
        """Whether `latest` already points at the checkpoint of `step` (the tag format stays in this module)."""
        return self.latest_tag() == tag_for(step)

    def complete_tags(self) -> list[str]:
        return [t for t in self._tags() if self.storage.exists(f"{t}/{COMPLETE}")]

    def verify(self, tag: str) -> dict[str, int]:
        """Check, before anything is loaded, that every rank's marker exists and every file it lists is stored at
        its recorded size. Returns {relative file: size}. Raises CheckpointError naming what is missing."""
        check_tag(tag, f"checkpoint in {self.url}")
        keys = set(self.storage.list(f"{tag}/"))
        if f"{tag}/{COMPLETE}" not in keys:
            raise CheckpointError(f"checkpoint {tag} in {self.url} has no {COMPLETE} marker; it will not be loaded")
        world = int(self.read_meta(tag).get("world_size", 0))
        markers = sorted(k for k in keys if k.startswith(f"{tag}/_ranks/") and k.endswith(".json"))
        if len(markers) != world:
            raise CheckpointError(f"checkpoint {tag} in {self.url}: {len(markers)} rank markers for a world size of "
                                  f"{world}; it is incomplete and will not be loaded")
        want: dict[str, int] = {}
        self._sums: dict[str, str] = {}
        for m in markers:
            rec = json.loads(self.storage.get_text(m))
            for rel in rec["files"]:
                _inside("/", rel)
                want[rel] = rec.get("sizes", {}).get(rel, -1)
                if rel in rec.get("sha256", {}):
                    self._sums[rel] = rec["sha256"][rel]
        for rel, size in sorted(want.items()):
            key = f"{tag}/{rel}"
            if key not in keys:
                raise CheckpointError(f"checkpoint {tag} in {self.url} is missing {rel}; it will not be loaded")
            if size >= 0 and self.storage.size(key) != size:
                raise CheckpointError(f"checkpoint {tag} in {self.url}: {rel} has {self.storage.size(key)} bytes, "
                                      f"its rank marker says {size}; it will not be loaded")
        return want

    def download(self, tag: str, dest: str | None = None, only: Callable[[str], bool] | None = None) -> str:
        """Fetch tag's files (as listed by the rank markers, after `verify`) into dest/tag (default: this rank's
        staging/restore). Returns dest."""
        files = self.verify(tag)
        dest = dest or os.path.join(self.staging, "restore")
        root = os.path.join(dest, tag)
        shutil.rmtree(root, ignore_errors=True)
        for rel in sorted(files):
            if only is not None and not only(rel):
                continue
            path = _inside(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.storage.get_file(f"{tag}/{rel}", path)
            if rel in self._sums and _sha256(path) != self._sums[rel]:
                raise CheckpointError(f"checkpoint {tag} in {self.url}: {rel} does not match the sha256 its rank "
                                      "marker recorded at save time; it will not be loaded")
        return dest

    def read_meta(self, tag: str) -> dict:
        return json.loads(self.storage.get_text(f"{tag}/{COMPLETE}"))

    # -- derived folders (e.g. the universal form of a tag), cached next to it and removed with it ----------
    def put_folder(self, tag: str, name: str, folder: str, meta: dict | None = None) -> int:
        """Upload `folder` as <tag>/<name>/..., then its COMPLETE record (files, sizes, sha256). Returns bytes."""
        check_tag(tag, f"checkpoint in {self.url}")
        files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
        for rel in files:
            self.storage.put_file(f"{tag}/{name}/{rel}", os.path.join(folder, rel))
        sizes = {rel: os.path.getsize(os.path.join(folder, rel)) for rel in files}
        sums = {rel: _sha256(os.path.join(folder, rel)) for rel in files}
        self.storage.put_text(f"{tag}/{name}/{COMPLETE}", json.dumps(dict(meta or {}, files=files, sizes=sizes,
                                                                          sha256=sums)))
        return sum(sizes.values())

    def folder_meta(self, tag: str, name: str) -> dict | None:
        """The COMPLETE record of <tag>/<name>, or None when it was never (completely) uploaded."""
        key = f"{check_tag(tag, f'checkpoint in {self.url}')}/{name}/{COMPLETE}"
        return json.loads(self.storage.get_text(key)) if self.storage.exists(key) else None

    def get_folder(self, tag: str, name: str, dest: str) -> str:
        """Download <tag>/<name> (which must be complete) into dest, checking every file's sha256. Returns dest."""
        rec = self.folder_meta(tag, name)
        if rec is None:
            raise CheckpointError(f"{self.url}/{tag}/{name} is not complete; it will not be loaded")
        shutil.rmtree(dest, ignore_errors=True)
        for rel in rec["files"]:
            path = _inside(dest, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.storage.get_file(f"{tag}/{name}/{rel}", path)
            if _sha256(path) != rec["sha256"][rel]:
                raise CheckpointError(f"{self.url}/{tag}/{name}/{rel} does not match its recorded sha256")
        return dest

