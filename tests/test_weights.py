"""service.weights: local dirs and tars win, present weights never touch the network, Hub downloads are verified."""

import fnmatch
import hashlib
import io
import os
import shutil
import socket
import tarfile
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling
from safetensors.torch import save

from service.settings import WEIGHTS_ENV, Settings
from service.weights import HUB_REPOS, WeightPaths, fetch_lora, lora_url, resolve_weights

FOLDERS = list(HUB_REPOS)


@pytest.fixture(autouse=True)
def no_cog_weights(monkeypatch):
    monkeypatch.delenv("COG_WEIGHTS", raising=False)


def _refuse(*args, **kwargs):
    raise AssertionError("network access attempted")


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _refuse)
    monkeypatch.setattr(huggingface_hub, "HfApi", _refuse)


def _assert_paths(paths: WeightPaths, base: Path) -> None:
    assert paths == WeightPaths(*(base / folder for folder in FOLDERS))
    assert (paths.wan / "Wan2.1_VAE.pth").is_file() and (paths.multitalk / "multitalk.safetensors").is_file()


def test_weights_in_root_need_no_network(tiny_weights, tmp_path, no_network):
    root = tmp_path / "weights"
    shutil.copytree(tiny_weights, root)
    _assert_paths(resolve_weights(None, root), root)


def test_weights_argument_and_cog_weights_env_win_over_root(tiny_weights, tmp_path, no_network):
    empty_root = tmp_path / "weights"
    _assert_paths(resolve_weights(str(tiny_weights), empty_root), tiny_weights)
    _assert_paths(
        resolve_weights(Settings.from_env({WEIGHTS_ENV: str(tiny_weights)}).weights, empty_root), tiny_weights
    )
    assert not empty_root.exists()


def test_missing_weights_without_network_raise_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(OSError("network is unreachable")))
    root = tmp_path / "weights"
    with pytest.raises(RuntimeError) as caught:
        resolve_weights(None, root)
    message = str(caught.value)
    for what in (
        "COG_WEIGHTS",
        str(root.resolve()),
        "models_t5_umt5-xxl-enc-bf16.pth",
        "Wan2.1_VAE.pth",
        "chinese-wav2vec2-base",
        "diffusion_pytorch_model.safetensors.index.json",
        "MeiGen-MultiTalk/multitalk.safetensors",
        "InfiniteTalk/multi/infinitetalk.safetensors",
    ):
        assert what in message, what


def test_incomplete_weights_argument_is_an_error_not_a_download(tiny_weights, tmp_path, no_network):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_weights, broken)
    (broken / FOLDERS[0] / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(RuntimeError, match="Wan2.1_VAE.pth"):
        resolve_weights(str(broken), tmp_path / "weights")


class FakeHub:
    """The Hub as seen by huggingface_hub: file metadata and snapshots, served from the tiny_weights set on disk."""

    def __init__(self, tiny_weights: Path, corrupt: str | None = None, fail_after: int | None = None):
        self.repos = {repo: tiny_weights / name for name, repo in HUB_REPOS.items()}
        self.corrupt, self.fail_after = corrupt, fail_after
        self.calls = []

    def model_info(self, repo_id, files_metadata=False, **kwargs):
        assert files_metadata
        siblings = []
        for path in sorted(p for p in self.repos[repo_id].rglob("*") if p.is_file()):
            data = path.read_bytes()
            lfs = BlobLfsInfo(size=len(data), sha256=hashlib.sha256(data).hexdigest(), pointer_size=130)
            siblings.append(RepoSibling(path.relative_to(self.repos[repo_id]).as_posix(), len(data), None, lfs))
        siblings.append(RepoSibling("README.md", 10, None, None))  # not in the repo dir, never asked for
        return SimpleNamespace(sha="c0ffee" * 6 + "abcd", siblings=siblings)

    def snapshot_download(self, repo_id, revision, local_dir, allow_patterns):
        self.calls.append((repo_id, revision, tuple(allow_patterns)))
        source = self.repos[repo_id]
        for n, path in enumerate(sorted(p for p in source.rglob("*") if p.is_file())):
            name = path.relative_to(source).as_posix()
            if not any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                continue
            if self.fail_after is not None and n >= self.fail_after:
                raise ConnectionError("connection reset by peer")
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            data = bytearray(path.read_bytes())
            if name == self.corrupt:
                data[len(data) // 2] ^= 0xFF
            target.write_bytes(bytes(data))
        return str(local_dir)

    def install(self, monkeypatch):
        monkeypatch.setattr(huggingface_hub, "HfApi", lambda: self)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(socket.socket, "connect", _refuse)


@pytest.fixture
def tiny_with_extra(tiny_weights, tmp_path) -> Path:
    """The tiny_weights set plus a file the published wav2vec repo has but we never read."""
    copy = tmp_path / "hub"
    shutil.copytree(tiny_weights, copy)
    (copy / FOLDERS[2] / "chinese-wav2vec2-base-fairseq-ckpt.pt").write_bytes(b"unused" * 100)
    return copy


def test_hub_download_fetches_only_our_files_verifies_and_renames(tiny_with_extra, tmp_path, monkeypatch):
    hub = FakeHub(tiny_with_extra)
    hub.install(monkeypatch)
    root = tmp_path / "weights"
    _assert_paths(resolve_weights(None, root), root)
    assert sorted(p.name for p in root.iterdir()) == sorted(FOLDERS)  # no .partial left
    assert [call[0] for call in hub.calls] == list(HUB_REPOS.values())
    assert all(call[1] == "c0ffee" * 6 + "abcd" for call in hub.calls)  # pinned to the commit that was checked
    assert not (root / FOLDERS[2] / "chinese-wav2vec2-base-fairseq-ckpt.pt").exists()
    assert (root / FOLDERS[0] / "google" / "umt5-xxl" / "spiece.model").is_file()


def test_corrupt_download_is_rejected_kept_partial_and_refetched(tiny_weights, tmp_path, monkeypatch):
    root = tmp_path / "weights"
    bad = FakeHub(tiny_weights, corrupt="Wan2.1_VAE.pth")
    bad.install(monkeypatch)
    with pytest.raises(RuntimeError, match="sha256") as caught:
        resolve_weights(None, root)
    assert "Wan2.1_VAE.pth" in str(caught.value)
    partial = root / (FOLDERS[0] + ".partial")
    assert partial.is_dir() and not (root / FOLDERS[0]).exists()
    assert not (partial / "Wan2.1_VAE.pth").exists()  # deleted so the rerun fetches it again
    assert (partial / "config.json").is_file()  # the good files stay for the resume

    FakeHub(tiny_weights).install(monkeypatch)
    _assert_paths(resolve_weights(None, root), root)
    assert not partial.exists()


def test_interrupted_download_keeps_partial_and_reports_missing_files(tiny_weights, tmp_path, monkeypatch):
    root = tmp_path / "weights"
    FakeHub(tiny_weights, fail_after=3).install(monkeypatch)
    with pytest.raises(RuntimeError, match="connection reset by peer") as caught:
        resolve_weights(None, root)
    assert "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth" in str(caught.value)
    assert len(list((root / (FOLDERS[0] + ".partial")).iterdir())) == 3


def test_size_mismatch_is_rejected(tiny_weights, tmp_path, monkeypatch):
    hub = FakeHub(tiny_weights)
    real_info = hub.model_info

    def info_with_wrong_size(repo_id, **kwargs):
        info = real_info(repo_id, **kwargs)
        info.siblings = [
            RepoSibling(s.rfilename, s.size + 1, None, s.lfs) if s.rfilename == "config.json" else s
            for s in info.siblings
        ]
        return info

    hub.model_info = info_with_wrong_size
    hub.install(monkeypatch)
    with pytest.raises(RuntimeError, match="config.json: .* bytes, the Hub says"):
        resolve_weights(None, tmp_path / "weights")


@pytest.mark.parametrize("prefix", ["", "multitalk-weights/"])
def test_tar_url_is_downloaded_once_and_extracted_under_root(tiny_weights, tmp_path, loopback, monkeypatch, prefix):
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name in FOLDERS:
            tar.add(tiny_weights / name, arcname=prefix + name)
    url = loopback.url(f"trained-{len(prefix)}.tar", archive.getvalue())
    root = tmp_path / "weights"
    # A stale partial from an interrupted attempt: this server ignores Range, so it must be overwritten, not appended.
    root.mkdir()
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    (root / f"url-{key}.tar.partial").write_bytes(b"garbage")

    paths = resolve_weights(url, root)
    _assert_paths(paths, root / f"url-{key}" / prefix.rstrip("/") if prefix else root / f"url-{key}")
    assert sorted(p.name for p in root.iterdir()) == [f"url-{key}"]  # archive and .partial dir removed

    monkeypatch.setattr(socket.socket, "connect", _refuse)
    assert resolve_weights(url, root) == paths


def safetensors_bytes(fill: int, count: int = 250) -> bytes:
    return save({"x": torch.full((count,), float(fill))})


def test_lora_cache_keeps_the_recently_used_within_its_budget(tmp_path, loopback):
    urls = [loopback.url(f"lora{k}.safetensors", safetensors_bytes(k)) for k in range(3)]
    size = len(safetensors_bytes(0))
    cache = tmp_path / "cache"
    first = fetch_lora(urls[0], cache, max_bytes=int(2.5 * size))
    second = fetch_lora(urls[1], cache, max_bytes=int(2.5 * size))
    os.utime(first, (1, 1))  # used long ago
    os.utime(second, (2, 2))
    assert fetch_lora(urls[0], cache, max_bytes=int(2.5 * size)) == first  # a hit: no download, now the most recent
    third = fetch_lora(urls[2], cache, max_bytes=int(2.5 * size))
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, third.name])  # `second` was evicted
    assert third.read_bytes() == safetensors_bytes(2)
    assert fetch_lora(urls[1], cache, max_bytes=size // 2).read_bytes() == safetensors_bytes(1)  # alone over: kept
    assert [p.name for p in cache.iterdir()] == [second.name]


def test_lora_references_are_urls_or_hugging_face_files(tmp_path):
    assert lora_url("https://x.org/a.safetensors") == "https://x.org/a.safetensors"
    hub = "https://huggingface.co/Kijai/WanVideo_comfy/resolve/main/Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"
    assert lora_url("Kijai/WanVideo_comfy/Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors") == hub
    assert lora_url("hf://Kijai/WanVideo_comfy/Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors") == hub
    assert lora_url("me/loras@v2/wan/style.safetensors", "http://hub.local") == (
        "http://hub.local/me/loras/resolve/v2/wan/style.safetensors"
    )
    for bad in ("style.safetensors", "/etc/passwd", "file:///etc/x.safetensors", "me/loras/notes.txt", "ftp://x/y"):
        with pytest.raises(ValueError, match="lora_url: .* neither an http.s. URL nor a Hugging Face file"):
            lora_url(bad)
    with pytest.raises(ValueError, match="lora_url: cannot use http://127.0.0.1:9/a b.safetensors"):
        fetch_lora("http://127.0.0.1:9/a b.safetensors", tmp_path)


def test_a_hugging_face_reference_downloads_from_the_hub(tmp_path, loopback):
    loopback.files["me/loras/resolve/main/style.safetensors"] = safetensors_bytes(7)
    path = fetch_lora("hf://me/loras/style.safetensors", tmp_path / "cache", hf_endpoint=loopback.base)
    assert path.read_bytes() == safetensors_bytes(7)


@pytest.mark.parametrize("sized", [True, False], ids=["declared", "streamed"])
def test_a_lora_over_the_size_limit_is_refused_and_nothing_stays(tmp_path, loopback, sized):
    url = loopback.url(f"big-{sized}.safetensors", safetensors_bytes(1, count=4000))  # 16 kB
    if not sized:
        loopback.unsized.add(f"big-{sized}.safetensors")
    with pytest.raises(ValueError, match=r"lora_url: cannot use .*over the .* GiB a file may have"):
        fetch_lora(url, tmp_path / "cache", file_limit=10_000)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"<html>not found</html>" * 20, "no header at its start"),
        (safetensors_bytes(3)[:-40], "do not fill it"),  # truncated
        ((20).to_bytes(8, "little") + b"{not json at all....", "no JSON"),
    ],
    ids=["html", "truncated", "bad-header"],
)
def test_a_file_that_is_not_safetensors_is_refused_before_any_merge(tmp_path, loopback, content, reason):
    url = loopback.url(f"{reason.replace(' ', '-')}.safetensors", content)
    with pytest.raises(ValueError, match=f"lora_url: cannot use .*{reason}"):
        fetch_lora(url, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
