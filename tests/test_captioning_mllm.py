"""The transformers captioning backend end to end on a tiny random Qwen2-VL, saved and loaded by path."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from csmcir.captioning import read_store
from csmcir.captioning.backends import TransformersBackend
from csmcir.captioning.prompts import NATURAL
from csmcir.testing.tiny_mllm import make_tiny_qwen2vl


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_mllm(request, tmp_path_factory):
    return str(make_tiny_qwen2vl(tmp_path_factory.mktemp(request.param), arch=request.param))


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in [(64, 64, 3), (48, 80, 3), (56, 56, 3)]]


def test_backend_formats_the_prompt_with_the_chat_template_and_batches_like_single_calls(tiny_mllm):
    b = TransformersBackend(tiny_mllm, device="cpu", max_new_tokens=12)
    text = b.processor.apply_chat_template(b.messages(NATURAL.prompt()), add_generation_prompt=True, tokenize=False)
    # the image placeholder comes before the MCoT instruction, and the assistant turn is open
    assert text.index("<|vision_start|><|image_pad|><|vision_end|>") < text.index("1. Scene:")
    assert text.endswith("<|im_start|>assistant\n")
    images = _images()
    batched = b.generate(["a", "b", "c"], images, NATURAL.prompt())
    single = [b.generate([i], [img], NATURAL.prompt())[0] for i, img in zip("abc", images)]
    assert batched == single  # left padding: a row's answer does not depend on its batch
    assert b.settings() == {"max_new_tokens": 12, "do_sample": False, "dtype": "float32"}


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "csmcir.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_captions_with_the_mllm_survives_a_kill_and_resumes_to_every_id_once(tiny_mllm, easy_bench, tmp_path):
    from csmcir.captioning import split_image_ids
    from csmcir.data.custom import CustomCIR

    ids = split_image_ids(CustomCIR(easy_bench), "val")[:40]
    out = tmp_path / "caps.jsonl"
    args = [
        "caption",
        "--root",
        str(easy_bench),
        "--split",
        "val",
        "--backend",
        "transformers",
        "--model",
        tiny_mllm,
        "--out",
        str(out),
        "--limit",
        "40",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "24",
        "--device",
        "cpu",
        "--no-progress",
    ]
    p = _cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and (not out.exists() or out.read_bytes().count(b"\n") < 3):
        time.sleep(0.005)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    n_killed = len(read_store(out, repair=True))
    assert 3 <= n_killed < 40
    p = _cli(*args)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    stats = json.loads(stdout)
    assert stats["already_done"] == n_killed and stats["already_done"] + stats["captioned"] == 40
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["image_id"] for r in lines) == sorted(ids)  # every id exactly once
    r = lines[0]
    assert r["model"] == tiny_mllm and r["prompt"] == "natural@1" and r["generation"]["max_new_tokens"] == 24
    # random weights do not follow the format: the raw text is kept and becomes the final caption
    assert all(x["status"] in ("unparsed", "empty") for x in lines)
    assert all(x["final"] == NATURAL.parse(x["raw"]).final for x in lines)


def test_caption_a_real_benchmark_layout(tiny_mllm, tmp_path, capsys):
    """CIRR val (annotations from ../shared, placeholder images): ids are the split's image names,
    the natural template is used; FashionIQ defaults to the fashion template and a missing image
    stops the run with one line naming it, keeping what was written."""
    from csmcir.cli import main

    from .test_benchmarks import FIQ, SHARED, _cirr_tree

    if not SHARED.is_dir():
        pytest.skip(f"no benchmark annotations at {SHARED}")
    import io

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    root, names = _cirr_tree(tmp_path, "val", buf.getvalue())
    out = tmp_path / "cirr.jsonl"
    common = ["--backend", "transformers", "--model", tiny_mllm, "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]
    assert main(["caption", "--dataset", "cirr", "--root", str(root), "--split", "val", "--limit", "5", "--out", str(out), *common]) == 0
    recs = read_store(out)
    assert len(recs) == 5 and set(recs) <= set(names) and {r["prompt"] for r in recs.values()} == {"natural@1"}
    capsys.readouterr()
    fiq = tmp_path / "fiq"
    import shutil

    shutil.copytree(FIQ / "captions", fiq / "captions")
    shutil.copytree(FIQ / "image_splits", fiq / "image_splits")
    code = main(
        [
            "caption",
            "--dataset",
            "fashioniq",
            "--root",
            str(fiq),
            "--category",
            "dress",
            "--split",
            "val",
            "--out",
            str(tmp_path / "fiq.jsonl"),
            *common,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "images to caption are missing" in err and "fiq/images" in err
    assert not read_store(tmp_path / "fiq.jsonl")  # stopped before the model loaded: nothing written


def test_a_corrupt_image_stops_the_run_naming_it_and_keeps_the_batches_before(tiny_mllm, bench_copy, tmp_path, capsys):
    from csmcir.captioning import split_image_ids
    from csmcir.cli import main
    from csmcir.data.custom import CustomCIR

    ids = split_image_ids(CustomCIR(bench_copy), "val")
    bad = CustomCIR(bench_copy).image_path(ids[5])
    bad.write_bytes(bad.read_bytes()[:40])  # truncated file
    out = tmp_path / "c.jsonl"
    code = main(
        [
            "caption",
            "--root",
            str(bench_copy),
            "--split",
            "val",
            "--limit",
            "8",
            "--batch-size",
            "2",
            "--out",
            str(out),
            "--backend",
            "transformers",
            "--model",
            tiny_mllm,
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and ids[5] in err and str(bad) in err and "cannot decode image" in err
    assert list(read_store(out)) == ids[:4]  # the two batches before the bad one are kept
