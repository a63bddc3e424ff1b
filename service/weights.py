"""Where the checkpoint folders come from: cog's `weights`, a local `weights/` dir, or the Hugging Face Hub; and the
users' LoRAs, fetched from their URLs into a cache that evicts.

Order: the `weights` argument (cog passes `COG_WEIGHTS` there; the runner passes the variable too when the argument
is empty) naming a local dir or an http(s) tar; else `root` if it already holds every file; else the published repos,
downloaded into `root`. With the files present nothing touches the network. Downloads go to `<dir>.partial` (kept on failure, so a
rerun resumes) and are renamed into place only after every file's size and sha256 match the Hub's metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from src.audio.kokoro_layout import (
    KOKORO_DIR_NAME,
    KOKORO_REPO,
    TAGGER_COMPONENTS,
    TAGGER_DIR_NAME,
    TAGGER_FILES,
    TAGGER_REPO,
    kokoro_files,
)
from wan.loading.checkpoints import (
    DIT_INDEX_NAME,
    FAST_LORA_DIR_NAME,
    FAST_LORA_NAME,
    INFINITETALK_DIR_NAME,
    INFINITETALK_FILES,
    MULTITALK_DIR_NAME,
    MULTITALK_WEIGHTS_NAME,
    SIZE_BUCKETS_NAME,
    WAN_DIR_NAME,
    WAV2VEC_DIR_NAME,
    WAV2VEC_FILES,
    WAV2VEC_WEIGHT_NAMES,
    WanFiles,
    check_files,
)

log = logging.getLogger(__name__)

HUB_REPOS = {
    WAN_DIR_NAME: "Wan-AI/Wan2.1-I2V-14B-480P",
    MULTITALK_DIR_NAME: "MeiGen-AI/MeiGen-MultiTalk",
    WAV2VEC_DIR_NAME: "TencentGameMate/chinese-wav2vec2-base",
    INFINITETALK_DIR_NAME: "MeiGen-AI/InfiniteTalk",
}
FAST_LORA_REPO = "Kijai/WanVideo_comfy"  # where lightx2v's step-distillation LoRA is published
# Text to speech (the `text` input): Kokoro-82M and the English tagger its phonemiser needs. Beside the others, but
# optional: without them every other input still works, and `text` says why it cannot.
SPEECH_REPOS = {KOKORO_DIR_NAME: KOKORO_REPO, TAGGER_DIR_NAME: TAGGER_REPO}
HASH_CHUNK = 16 << 20
LORA_CACHE_BYTES = 8 << 30  # user LoRAs kept between requests
LORA_MAX_BYTES = 4 << 30  # one user LoRA: a rank-256 LoRA of the 14B DiT in fp16 is ~2.4 GB
SAFETENSORS_HEADER_MAX = 100 << 20
HF_ENDPOINT = "https://huggingface.co"
# owner/repo[@revision]/path/in/the/repo
HF_REFERENCE = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w.-]+))?/(?P<path>[\w./-]+)")


@dataclasses.dataclass(frozen=True)
class WeightPaths:
    wan: Path
    multitalk: Path
    wav2vec: Path
    infinitetalk: Path

    @classmethod
    def under(cls, base: Path) -> "WeightPaths":
        base = Path(base)
        return cls(
            base / WAN_DIR_NAME, base / MULTITALK_DIR_NAME, base / WAV2VEC_DIR_NAME, base / INFINITETALK_DIR_NAME
        )

    def size_buckets(self) -> dict[str, dict[str, list[int]]]:
        """Bucket tables that replace the built-in ones of the same name, if the weights bring any."""
        path = self.wan.parent / SIZE_BUCKETS_NAME
        return json.loads(path.read_text()) if path.is_file() else {}


def resolve_weights(weights: str | os.PathLike | None = None, root: Path = Path("weights")) -> WeightPaths:
    """The checkpoint dirs, fetched first if needed; raises one RuntimeError naming every missing file."""
    root = Path(root)
    source = str(weights) if weights else None
    if source:
        base = fetch_tar(source, root) if source.startswith(("http://", "https://")) else Path(source)
        paths = WeightPaths.under(base)
        problems = missing_files(paths)
        if problems:
            raise RuntimeError(f"weights {source!r} (weights argument / COG_WEIGHTS) are incomplete:\n{problems}")
        return paths

    paths = WeightPaths.under(root)
    if not missing_files(paths):
        return paths
    try:
        download_missing(HUB_REPOS, root)
    except Exception as error:  # network, auth, disk or verification: all end in the same report
        raise RuntimeError(
            f"MultiTalk weights not found and the download failed ({type(error).__name__}: {error}).\n"
            f"Looked in: the weights argument and COG_WEIGHTS (both unset), then {root.resolve()}.\n"
            f"Missing:\n{missing_files(paths)}\n"
            f"Put the folders {list(HUB_REPOS)} in {root.resolve()}, or pass weights=DIR / a tar URL."
        ) from error
    problems = missing_files(paths)
    if problems:
        raise RuntimeError(f"weights in {root.resolve()} are incomplete (a folder not from our download?):\n{problems}")
    return paths


def missing_files(paths: WeightPaths) -> str:
    """Empty if every file the loaders read is there, else a readable list (`wan.loading.checkpoints.check_files`)."""
    try:
        check_files(paths.wan, paths.multitalk, paths.wav2vec, paths.infinitetalk)
    except FileNotFoundError as error:
        return str(error)
    return ""


def hub_patterns(name: str) -> list[str]:
    """The files we read from each published repo (the rest, e.g. the fairseq checkpoint, is never fetched)."""
    if name == WAN_DIR_NAME:
        wan = WanFiles(Path())
        shards = DIT_INDEX_NAME.split(".")[0] + "-*.safetensors"
        files = [wan.config, wan.dit_index, wan.t5, wan.clip, wan.vae]
        return [p.as_posix() for p in files] + [shards, f"{wan.t5_tokenizer.as_posix()}/*"]
    if name == MULTITALK_DIR_NAME:
        return [MULTITALK_WEIGHTS_NAME, DIT_INDEX_NAME]
    if name == WAV2VEC_DIR_NAME:
        return [*WAV2VEC_FILES, *WAV2VEC_WEIGHT_NAMES]
    if name == INFINITETALK_DIR_NAME:
        return list(INFINITETALK_FILES.values())  # not the quantised or ComfyUI variants
    if name == KOKORO_DIR_NAME:
        return kokoro_files()  # the model and the served voices (English, Mandarin), not the others or the ONNX export
    if name == TAGGER_DIR_NAME:  # the parts misaki runs, not the parser, NER or the packaged wheel
        return ["config.cfg", "meta.json", "tokenizer", "vocab/*", *(f"{part}/*" for part in TAGGER_COMPONENTS)]
    raise ValueError(f"unknown weights folder {name!r}")


def download_missing(repos: dict[str, str], root: Path) -> None:
    """`download_repo` for each published repo (folder name -> repo id) whose folder is not in `root` yet."""
    for name, repo_id in repos.items():
        if not (root / name).is_dir():
            download_repo(repo_id, root / name)


def download_repo(repo_id: str, target: Path) -> None:
    """Snapshot `repo_id` (our files only) into `target.partial`, verify it, then rename it to `target`."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    patterns = hub_patterns(target.name)
    partial = target.with_name(target.name + ".partial")
    info = HfApi().model_info(repo_id, files_metadata=True)
    expected = list(filter_repo_objects(info.siblings, allow_patterns=patterns, key=lambda s: s.rfilename))
    total = sum(s.size or 0 for s in expected)
    log.info("downloading %s@%s (%d files, %.1f GB) to %s", repo_id, info.sha[:8], len(expected), total / 1e9, partial)
    snapshot_download(repo_id, revision=info.sha, local_dir=partial, allow_patterns=patterns)
    verify_files(partial, expected)
    partial.rename(target)
    log.info("verified %s -> %s", repo_id, target)


def verify_files(folder: Path, expected) -> None:
    """Compare each downloaded file with the Hub's size (and LFS sha256); delete bad ones so a rerun refetches them."""
    problems = []
    for sibling in expected:
        path = folder / sibling.rfilename
        if not path.is_file():
            problems.append(f"{sibling.rfilename}: not downloaded")
            continue
        size = path.stat().st_size
        if sibling.size is not None and size != sibling.size:
            problems.append(f"{sibling.rfilename}: {size} bytes, the Hub says {sibling.size}")
        elif sibling.lfs is not None and file_sha256(path) != sibling.lfs.sha256:
            problems.append(f"{sibling.rfilename}: sha256 differs from the Hub's {sibling.lfs.sha256}")
        else:
            continue
        path.unlink()
    if problems:
        raise RuntimeError(
            f"download check failed in {folder} (bad files deleted; rerun to fetch them again): " + "; ".join(problems)
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class SpeechPaths:
    kokoro: Path
    tagger: Path


def speech_missing(paths: SpeechPaths) -> list[str]:
    required = [paths.kokoro / name for name in kokoro_files()] + [paths.tagger / name for name in TAGGER_FILES]
    return [str(path) for path in required if not path.is_file()]


def resolve_speech(paths: WeightPaths) -> SpeechPaths:
    """Kokoro-82M and spaCy's English tagger beside the checkpoint folders; each downloaded (verified, atomic) when
    missing. Raises a RuntimeError naming what is missing and why it could not be fetched."""
    root = paths.wan.parent
    speech = SpeechPaths(root / KOKORO_DIR_NAME, root / TAGGER_DIR_NAME)
    try:
        download_missing(SPEECH_REPOS, root)
    except Exception as error:  # network, auth, disk or verification
        raise RuntimeError(
            f"{', '.join(SPEECH_REPOS.values())} not in {root} and could not be downloaded "
            f"({type(error).__name__}: {error})"
        ) from error
    missing = speech_missing(speech)
    if missing:
        raise RuntimeError(f"the speech weights in {root} are incomplete: missing {', '.join(missing[:5])}")
    return speech


def resolve_fast_lora(paths: WeightPaths) -> Path:
    """lightx2v's LoRA in `loras/` beside the checkpoint folders; downloaded (verified, atomic) when missing."""
    path = paths.wan.parent / FAST_LORA_DIR_NAME / FAST_LORA_NAME
    if path.is_file():
        return path
    from huggingface_hub import HfApi, hf_hub_download

    partial = path.parent / (FAST_LORA_DIR_NAME + ".partial")
    info = HfApi().model_info(FAST_LORA_REPO, files_metadata=True)
    expected = [s for s in info.siblings if s.rfilename == FAST_LORA_NAME]
    if not expected:
        raise RuntimeError(f"{FAST_LORA_REPO} no longer holds {FAST_LORA_NAME}")
    hf_hub_download(FAST_LORA_REPO, FAST_LORA_NAME, revision=info.sha, local_dir=partial)
    verify_files(partial, expected)
    path.parent.mkdir(parents=True, exist_ok=True)
    (partial / FAST_LORA_NAME).rename(path)
    shutil.rmtree(partial, ignore_errors=True)
    return path


def lora_url(reference: str, hf_endpoint: str = HF_ENDPOINT) -> str:
    """The URL of a user's LoRA: an http(s) URL as it is; a Hugging Face file as `hf://owner/repo/path` or
    `owner/repo/path.safetensors` (its main revision; `owner/repo@revision/path` names another)."""
    text = reference.strip()
    if text.startswith(("http://", "https://")):
        return text
    match = HF_REFERENCE.fullmatch(text.removeprefix("hf://"))
    if match is None or not (text.startswith("hf://") or text.endswith(".safetensors")):
        raise ValueError(
            f"lora_url: {reference!r} is neither an http(s) URL nor a Hugging Face file; give a URL of a .safetensors "
            "file, or owner/repo/file.safetensors (hf://owner/repo/file.safetensors)"
        )
    return f"{hf_endpoint.rstrip('/')}/{match['repo']}/resolve/{match['revision'] or 'main'}/{match['path']}"


def fetch_lora(
    reference: str,
    cache: Path,
    max_bytes: int = LORA_CACHE_BYTES,
    file_limit: int = LORA_MAX_BYTES,
    hf_endpoint: str = HF_ENDPOINT,
) -> Path:
    """A user's LoRA (`lora_url`), downloaded once into `cache` (named after the URL's hash). A file over
    `file_limit` bytes is refused from its headers or, without them, as soon as it grows past; a file that is not
    safetensors is refused before anything reads its tensors; nothing is left behind. The cache keeps at most
    `max_bytes`: the least recently used files go first (the one just asked for always stays)."""
    url = lora_url(reference, hf_endpoint)
    target = cache / f"lora-{hashlib.sha256(url.encode()).hexdigest()[:16]}.safetensors"
    if target.is_file():
        os.utime(target)  # recently used
    else:
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        try:
            _download(url, partial, file_limit)
            check_safetensors(partial)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
            partial.unlink(missing_ok=True)
            reason = error.reason if isinstance(error, urllib.error.URLError) else error
            raise ValueError(f"lora_url: cannot use {reference} ({reason})") from error
        partial.rename(target)
    evict_least_recently_used(cache, max_bytes, keep=target)
    return target


def check_safetensors(path: Path) -> None:
    """A ValueError unless `path` is a whole safetensors file: a JSON header of tensors whose data fills the rest."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if not 2 <= length <= min(size - 8, SAFETENSORS_HEADER_MAX):
            raise ValueError("not a safetensors file: no header at its start")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"not a safetensors file: its header is no JSON ({error})") from None
    tensors = (
        {name: entry for name, entry in header.items() if name != "__metadata__"} if isinstance(header, dict) else {}
    )
    ends = [entry.get("data_offsets", [0, 0])[1] for entry in tensors.values() if isinstance(entry, dict)]
    if not tensors or len(ends) != len(tensors) or max(ends) != size - 8 - length:
        raise ValueError("not a whole safetensors file: its tensors do not fill it (truncated?)")


def evict_least_recently_used(cache: Path, max_bytes: int, keep: Path) -> None:
    files = sorted((p for p in cache.glob("lora-*.safetensors") if p != keep), key=lambda p: p.stat().st_mtime)
    total = keep.stat().st_size + sum(p.stat().st_size for p in files)
    for old in files:
        if total <= max_bytes:
            break
        total -= old.stat().st_size
        old.unlink()
        log.info("LoRA cache: evicted %s", old.name)


def fetch_tar(url: str, root: Path) -> Path:
    """Download and extract a weights tar once; the dir (named after the URL's hash) holding the three folders."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = root / f"url-{key}"
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        archive = root / f"url-{key}.tar.partial"
        _download(url, archive)
        extracted = root / f"url-{key}.partial"
        shutil.rmtree(extracted, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(extracted, filter="data")
        extracted.rename(target)
        archive.unlink()
    # The three folders may sit at the top of the tar or inside one folder.
    children = [p for p in target.iterdir() if p.is_dir()]
    if not (target / WAN_DIR_NAME).is_dir() and len(children) == 1:
        return children[0]
    return target


def _download(url: str, path: Path, limit: int | None = None) -> None:
    """Fetch `url` into `path`, resuming from what a previous attempt left there when the server allows ranges;
    more than `limit` bytes in all, as declared or as read, is a ValueError."""
    done = path.stat().st_size if path.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    log.info("downloading %s to %s%s", url, path, f" (resuming at {done} bytes)" if done else "")
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416 and done:  # the previous attempt had already fetched everything
            return
        raise
    with response, open(path, "ab" if done and response.status == 206 else "wb") as f:
        written = f.tell()
        declared = response.headers.get("Content-Length")
        if limit is not None and declared is not None and written + int(declared) > limit:
            raise ValueError(f"{written + int(declared)} bytes, over the {limit / 2**30:g} GiB a file may have")
        while chunk := response.read(HASH_CHUNK):
            written += len(chunk)
            if limit is not None and written > limit:
                raise ValueError(f"over the {limit / 2**30:g} GiB a file may have")
            f.write(chunk)
