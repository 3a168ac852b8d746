"""FID and paired fidelity: the math, folders, paired generation, resuming, bad input, the CLI.

The Inception weights cannot be had here, so FID runs on ``stand_in_features`` below (a fixed
random projection, passed as ``test_fid:stand_in_features`` exactly as a user would pass their
own ``module:callable``); the Inception path is tested for failing clearly without a download.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import socket
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastdiff import DeepCache
from fastdiff.cli import main
from fastdiff.evals.fid import (
    INCEPTION_WEIGHTS_FILES,
    FrechetAccumulator,
    feature_statistics,
    fid_folders,
    frechet_distance,
    load_extractor,
)
from fastdiff.evals.fidelity import format_seeds, paired_fidelity, parse_seeds, read_prompts

STAND_IN = "test_fid:stand_in_features"
SMALL = {"steps": 3, "height": 32, "width": 32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """tiny-sd's kernels are too small to gain from intra-op threads, and on a shared 2-core machine
    the pool's spin-waiting makes each call up to 100x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class StandInFeatures(torch.nn.Module):
    """Any-size uint8 images -> 12 features: 4x4 average colours through a fixed random projection."""

    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(12, 48, generator=generator) / 7, requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return torch.tanh(3 * pooled @ self.weight.T)


def stand_in_features() -> torch.nn.Module:
    return StandInFeatures()


def write_images(folder: Path, count: int, seed: int, size: int = 16, mode: str = "RGB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"{i:03d}.png")
    return folder


def folder_features(folder: Path) -> np.ndarray:
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])
    with torch.no_grad():
        return StandInFeatures()(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()


# --- the distance ----------------------------------------------------------------------------

def test_frechet_distance_closed_form():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2; diagonal covariances: the same per dimension, summed.
    one_d = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]]))
    assert one_d == pytest.approx(5.0)
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-9)


def test_torchmetrics_agrees_with_independent_implementation():
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(300, 8, generator=generator)
    mixing = torch.randn(8, 8, generator=generator) / 3
    fake = torch.randn(250, 8, generator=generator) @ mixing + 0.5
    accumulator = FrechetAccumulator(8)
    for chunk in real.split(64):  # in batches, as folders are read
        accumulator.update(chunk, real=True)
    accumulator.update(fake, real=False)
    expected = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    assert expected > 1
    assert accumulator.compute() == pytest.approx(expected, rel=1e-3)


# --- folders ---------------------------------------------------------------------------------

def test_identical_folders_give_zero(tmp_path):
    folder = write_images(tmp_path / "a", 24, seed=0)
    result = fid_folders(folder, folder, features=STAND_IN, batch_size=7, show_progress=False)
    assert abs(result.value) < 1e-3
    assert (result.n_real, result.n_fake, result.extractor) == (24, 24, STAND_IN)


def test_folder_fid_matches_features_by_hand(tmp_path):
    real, fake = write_images(tmp_path / "real", 30, seed=0), write_images(tmp_path / "fake", 20, seed=1, size=24)
    result = fid_folders(real, fake, features=STAND_IN, batch_size=8, show_progress=False)
    expected = frechet_distance(*feature_statistics(folder_features(real)), *feature_statistics(folder_features(fake)))
    assert result.value == pytest.approx(expected, rel=1e-3)
    assert json.loads(result.to_json())["settings"]["fake_size"] == [24, 24]


def test_mixed_sizes_and_modes_are_converted_with_a_warning(tmp_path):
    folder = write_images(tmp_path / "mixed", 4, seed=0, size=16)
    write_images(tmp_path / "gray", 2, seed=1, size=20, mode="L")
    for i, path in enumerate(sorted((tmp_path / "gray").glob("*.png"))):
        path.rename(folder / f"z{i}.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "y.jpg")
    with pytest.warns(UserWarning, match=r"2 of 7 images are not RGB.*2 are not 16x16"):
        result = fid_folders(folder, folder, features=STAND_IN, show_progress=False)
    assert result.n_real == 7 and abs(result.value) < 1e-3


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing", "real_dir: .* is not a folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "real_dir: .* has 0 PNG/JPEG image"),
    (lambda d: write_images(d / "one", 1, seed=0), "FID needs at least 2"),
])
def test_bad_real_folder(tmp_path, setup, message):
    fake = write_images(tmp_path / "fake", 3, seed=0)
    with pytest.raises(ValueError, match=message):
        fid_folders(setup(tmp_path), fake, features=STAND_IN, show_progress=False)


def test_unreadable_image_and_bad_feature_spec(tmp_path):
    folder = write_images(tmp_path / "a", 3, seed=0)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="fake_dir: cannot read image .*broken.png"):
        fid_folders(write_images(tmp_path / "b", 3, seed=0), folder, features=STAND_IN, show_progress=False)
    with pytest.raises(ValueError, match="features: 'resnet' is not"):
        load_extractor("resnet")
    with pytest.raises(ValueError, match="cannot load 'no_such_module_xyz:f'"):
        load_extractor("no_such_module_xyz:f")


def test_digits_extractor_is_imported_lazily(monkeypatch):
    fake = types.ModuleType("fastdiff.models.digits")
    fake.load_feature_network = stand_in_features
    monkeypatch.setitem(sys.modules, "fastdiff.models.digits", fake)
    extractor = load_extractor("digits")
    assert (extractor.name, extractor.num_features) == ("digits", 12)
    assert extractor(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).shape == (2, 12)


def test_builtin_digits_network(tmp_path):
    digits = pytest.importorskip("fastdiff.models.digits")
    try:
        digits.load_feature_network()
    except FileNotFoundError:
        pytest.skip("the digits feature network is not trained in this checkout")
    real = write_images(tmp_path / "real", 12, seed=0, size=8)
    fake = write_images(tmp_path / "fake", 12, seed=1, size=8)
    assert abs(fid_folders(real, real, features="digits", show_progress=False).value) < 1e-3
    assert fid_folders(real, fake, features="digits", show_progress=False).value > 0


# --- Inception: a clear error, never a download ----------------------------------------------

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache, and any attempt to reach the network fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(*args, **kwargs):
        raise AssertionError("attempted a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def test_inception_without_weights_names_the_file(offline):
    with pytest.raises(FileNotFoundError) as exc:
        load_extractor("inception")
    message = str(exc.value)
    assert str(offline / INCEPTION_WEIGHTS_FILES[0]) in message
    assert "--inception-weights" in message and "--features digits" in message
    with pytest.raises(FileNotFoundError, match="--inception-weights: .*nowhere.pth does not exist"):
        load_extractor("inception", inception_weights=offline / "nowhere.pth")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_says_so(offline):
    offline.mkdir(parents=True)
    (offline / INCEPTION_WEIGHTS_FILES[0]).write_bytes(b"weights")
    with pytest.raises(ModuleNotFoundError, match="torch-fidelity.*--features digits"):
        load_extractor("inception")


# --- seeds and prompts -----------------------------------------------------------------------

@pytest.mark.parametrize("text, seeds", [
    ("0-4", [0, 1, 2, 3, 4]), ("0,5,7", [0, 5, 7]), ("0-2,20-21", [0, 1, 2, 20, 21]), (" 3 , 9-9 ", [3, 9]),
])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds
    assert parse_seeds(format_seeds(seeds)) == seeds


@pytest.mark.parametrize("text", ["", "a", "1-", "-3", "5-2", "1-2-3", "0,,1", "0-3,2"])
def test_bad_seeds(text):
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds(text)


def test_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red car\n\n   \n  a blue boat  \n")
    assert read_prompts(path) == ["a red car", "a blue boat"]
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="--prompts: .* has no prompts"):
        read_prompts(path)
    with pytest.raises(ValueError, match="--prompts: cannot read"):
        read_prompts(tmp_path / "missing.txt")


# --- paired mode -----------------------------------------------------------------------------

def _paired(pipe, method, out_dir, seeds="0-3", **kwargs):
    from fastdiff.runner import GenerationRequest

    return paired_fidelity(pipe, [method], seeds, ["a red car", "a blue boat"], out_dir,
                           request=GenerationRequest(**SMALL), features=STAND_IN, batch_size=3,
                           show_progress=False, **kwargs)


def test_paired_no_reuse_is_identical_and_resumes(sd_pipe, tmp_path):
    result = _paired(sd_pipe, DeepCache(interval=1), tmp_path)
    assert (result.n, result.generated, result.identical_pairs) == (4, 8, 4)
    assert math.isinf(result.psnr_mean) and result.max_abs_diff == 0 and abs(result.fid_vs_vanilla) < 1e-3
    files = sorted(tmp_path.glob("*/*.png"))
    names = [p.relative_to(tmp_path).as_posix() for p in files]
    assert names[:2] == ["accelerated/000000.png", "accelerated/000001.png"] and names[4] == "vanilla/000000.png"
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again = _paired(sd_pipe, DeepCache(interval=1), tmp_path)
    assert again.generated == 0 and again.psnr_mean == result.psnr_mean
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    more = _paired(sd_pipe, DeepCache(interval=1), tmp_path, seeds="0-4")  # one more seed: one more pair
    assert (more.n, more.generated) == (5, 2)
    with pytest.raises(ValueError, match="--out-dir: .* other settings \\(methods"):
        _paired(sd_pipe, DeepCache(interval=3), tmp_path)
    assert not hasattr(sd_pipe, "acceleration") or sd_pipe.acceleration is None


def test_paired_with_reuse_differs_and_scores_against_real(sd_pipe, tmp_path):
    real = write_images(tmp_path / "real", 6, seed=0, size=32)
    result = _paired(sd_pipe, DeepCache(interval=3), tmp_path / "out", real_dir=real)
    assert math.isfinite(result.psnr_mean) and result.psnr_mean > 10
    assert result.identical_pairs == 0 and 0 < result.max_abs_diff <= 255
    assert result.fid_real_vanilla > 0 and result.fid_real_accelerated > 0 and result.n_real == 6
    record = json.loads(result.to_json())
    assert record["methods"] == ["deepcache:interval=3,branch=0"] and record["seeds"] == "0-3"


def test_batched_seeds_match_single_image_generation(sd_pipe, tmp_path):
    from fastdiff.runner import GenerationRequest, call_kwargs

    _paired(sd_pipe, DeepCache(interval=1), tmp_path, seeds="2,3")
    request = GenerationRequest(prompt="a blue boat", seed=3, **SMALL)  # seed 3 -> prompts[3 % 2]
    alone = sd_pipe(**call_kwargs(sd_pipe, request), output_type="np").images[0]
    alone = (alone * 255).round().astype(np.int16)
    batched = np.asarray(Image.open(tmp_path / "vanilla" / "000003.png")).astype(np.int16)
    assert np.abs(alone - batched).max() <= 1


def test_paired_bad_input_fails_before_generating(sd_pipe, tmp_path, offline):
    with pytest.raises(ValueError, match="--seeds: FID needs at least 2"):
        _paired(sd_pipe, DeepCache(interval=3), tmp_path, seeds="4")
    with pytest.raises(FileNotFoundError, match="weights-inception"):
        paired_fidelity(sd_pipe, [], "0-1", ["x"], tmp_path, features="inception", show_progress=False)
    assert not any(tmp_path.glob("**/*.png"))


# --- command line ----------------------------------------------------------------------------

def test_cli_folders_writes_json(tmp_path, capsys):
    real, fake = write_images(tmp_path / "real", 5, seed=0), write_images(tmp_path / "fake", 4, seed=1)
    out = tmp_path / "fid.json"
    assert main(["fid", str(real), str(fake), "--features", STAND_IN, "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "N real = 5" in printed and "N fake = 4" in printed and STAND_IN in printed
    assert json.loads(out.read_text())["value"] > 0


def test_cli_paired(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\na blue boat\n")
    out = tmp_path / "result.json"
    argv = ["fid", "--model", "tiny-sd", "--prompts", str(prompts), "--seeds", "0-2",
            "--method", "deepcache:interval=3", "--reference", "vanilla", "--out-dir", str(tmp_path / "pairs"),
            "--steps", "3", "--height", "32", "--width", "32", "--batch-size", "2", "--features", STAND_IN,
            "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "FID(accelerated, vanilla)" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["n"] == 3 and record["generated"] == 6 and math.isfinite(record["psnr_mean"])


@pytest.mark.parametrize("argv, message", [
    (["REAL", "FAKE"], "FAKE_DIR: no such folder"),
    (["REAL"], "give REAL_DIR and FAKE_DIR"),
    (["REAL", "REAL", "--features", "inception"], "weights-inception-2015-12-05-6726825d.pth"),
    (["REAL", "REAL", "--seeds", "0-3"], "--seeds: only with --model"),
    (["--model", "tiny-sd", "--prompts", "P", "--seeds", "0-x", "--out-dir", "O"], "--seeds: '0-x'"),
    (["--model", "tiny-sd", "--seeds", "0-3"], "paired mode needs --prompts, --out-dir"),
    (["--model", "tiny-sd", "--prompts", "BLANK", "--seeds", "0-3", "--out-dir", "O"], "--prompts: .* has no prompts"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, offline, argv, message):
    write_images(tmp_path / "real", 3, seed=0)
    (tmp_path / "blank.txt").write_text("\n\n")
    names = {"REAL": str(tmp_path / "real"), "FAKE": str(tmp_path / "fake"), "P": str(tmp_path / "blank.txt"),
             "BLANK": str(tmp_path / "blank.txt"), "O": str(tmp_path / "o")}
    with pytest.raises(SystemExit) as exc:
        main(["fid", "--no-progress", *(names.get(a, a) for a in argv)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff fid: error: ") and "Traceback" not in err
    assert re.search(message, err), err


# --- torch.distributed -----------------------------------------------------------------------

def _distributed_fid(rank: int, world: int, port: int, real: str, fake: str, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fid_folders(real, fake, features=STAND_IN, batch_size=2, device="cpu", show_progress=False)
        Path(out, f"{rank}.json").write_text(result.to_json())
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_folders_match_single_process(tmp_path):
    real, fake = write_images(tmp_path / "real", 9, seed=0), write_images(tmp_path / "fake", 7, seed=1)
    single = fid_folders(real, fake, features=STAND_IN, show_progress=False).value
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_distributed_fid, args=(2, port, str(real), str(fake), str(tmp_path)), nprocs=2)
    values = [json.loads((tmp_path / f"{rank}.json").read_text())["value"] for rank in range(2)]
    assert values[0] == values[1] == pytest.approx(single, rel=1e-6)
