"""CIR-CoT teacher embeddings on a tiny random Qwen2-VL saved and loaded by path; the store."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from csmcir.cli import main
from csmcir.errors import CsmcirError
from csmcir.teacher import EMB_TOKEN, QUERY_PROMPT, TeacherEncoder, TeacherStore, import_embeddings, read_reasoning, read_teacher_store
from csmcir.testing.tiny_mllm import make_tiny_qwen2vl


@pytest.fixture(scope="module")
def tiny_mllm(tmp_path_factory):
    return str(make_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2_vl"), arch="qwen2_vl"))


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, s, dtype=np.uint8)) for s in [(64, 64, 3), (48, 80, 3)]]


def _manual(enc, image, text, reasoning, layer):
    """One unpadded forward pass, the hidden state read at the position of <emb>, by hand."""
    seq = enc.chat(QUERY_PROMPT.format(text=text)) + reasoning + EMB_TOKEN
    inputs = enc.processor(text=[seq], images=[image], return_tensors="pt")
    with torch.no_grad():
        hs = enc.model(**inputs, output_hidden_states=True).hidden_states[layer][0]
    pos = (inputs["input_ids"][0] == enc.emb_id).nonzero().flatten()
    assert len(pos) == 1
    return hs[pos[0]].numpy()


@pytest.mark.parametrize("mode,layer", [("fast", -1), ("full", -1), ("fast", 1)])
def test_embedding_is_the_hidden_state_at_emb_in_a_batch_as_alone(tiny_mllm, mode, layer):
    enc = TeacherEncoder(tiny_mllm, device="cpu", layer=layer, max_new_tokens=6)
    assert EMB_TOKEN in enc.processor.tokenizer.get_vocab() and enc.dim == 64
    texts = ["make it red", "add a small striped square at the top left"]  # different lengths: left padding
    emb, reasoning = enc.embed(_images(), texts, mode)
    assert emb.shape == (2, 64) and emb.dtype == np.float32
    assert all(r for r in reasoning) if mode == "full" else reasoning == ["", ""]
    for k, (img, t) in enumerate(zip(_images(), texts)):
        np.testing.assert_allclose(emb[k], _manual(enc, img, t, reasoning[k], layer), rtol=1e-4, atol=1e-4)


def test_bad_layer_is_refused(tiny_mllm):
    with pytest.raises(CsmcirError, match="--layer 9: .* has 2 layers"):
        TeacherEncoder(tiny_mllm, device="cpu", layer=9)


def test_store_round_trip_resume_and_mismatches(tmp_path):
    s = TeacherStore(tmp_path / "t", model="m", mode="full", layer=-1)
    s.append(["q1", "q2"], np.ones((2, 4), np.float32), ["r1", "r2"])
    s2 = TeacherStore(tmp_path / "t", model="m", mode="full", layer=-1, shard=1)  # a second shard, same folder
    assert s2.done == {"q1", "q2"}
    s2.append(["q3"], np.zeros((1, 4), np.float32), ["r3"])
    header, ids, emb = read_teacher_store(tmp_path / "t")
    assert ids == ["q1", "q2", "q3"] and emb.shape == (3, 4) and header["dim"] == 4 and header["mode"] == "full"
    assert read_reasoning(tmp_path / "t") == {"q1": "r1", "q2": "r2", "q3": "r3"}
    with pytest.raises(CsmcirError, match="5-d embeddings for a 4-d store"):
        s.append(["q9"], np.ones((1, 5), np.float32))
    with pytest.raises(CsmcirError, match="'q1' is already embedded"):
        s.append(["q1"], np.ones((1, 4), np.float32))
    with pytest.raises(CsmcirError, match="holds mode='full', the run asks for 'fast'"):
        TeacherStore(tmp_path / "t", model="m", mode="fast")
    with pytest.raises(CsmcirError, match="teacher embeddings are 4-d, expected 8-d"):
        read_teacher_store(tmp_path / "t", expect_dim=8)
    s3 = TeacherStore(tmp_path / "t", model="m", mode="full", layer=-1, shard=2)
    s3.append(["q4"], np.ones((1, 4), np.float16))
    with pytest.raises(CsmcirError, match="dtype float16 differs"):
        read_teacher_store(tmp_path / "t")


def test_import_npy_and_safetensors_with_clear_errors(tmp_path):
    from safetensors.numpy import save_file

    np.save(tmp_path / "e.npy", np.arange(6, dtype=np.float32).reshape(3, 2))
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")
    assert import_embeddings(tmp_path / "s1", tmp_path / "e.npy", tmp_path / "ids.txt", "ext") == 3
    assert read_teacher_store(tmp_path / "s1")[1] == ["a", "b", "c"]
    (tmp_path / "ids2.txt").write_text("a\nb\n")
    with pytest.raises(CsmcirError, match="3 embeddings for 2 ids"):
        import_embeddings(tmp_path / "s2", tmp_path / "e.npy", tmp_path / "ids2.txt", "ext")
    (tmp_path / "ids3.txt").write_text("a\nb\na\n")
    with pytest.raises(CsmcirError, match="duplicate id 'a'"):
        import_embeddings(tmp_path / "s3", tmp_path / "e.npy", tmp_path / "ids3.txt", "ext")
    np.save(tmp_path / "i.npy", np.arange(6).reshape(3, 2))
    with pytest.raises(CsmcirError, match="dtype int64"):
        import_embeddings(tmp_path / "s4", tmp_path / "i.npy", tmp_path / "ids.txt", "ext")
    save_file({"embeddings": np.ones((2, 3), np.float32)}, str(tmp_path / "e.safetensors"), metadata={"ids": json.dumps(["x", "y"])})
    assert import_embeddings(tmp_path / "s5", tmp_path / "e.safetensors", None, "ext", kind="gallery") == 2
    save_file({"embeddings": np.ones((2, 3), np.float32)}, str(tmp_path / "noids.safetensors"))
    with pytest.raises(CsmcirError, match="no 'ids' metadata"):
        import_embeddings(tmp_path / "s6", tmp_path / "noids.safetensors", None, "ext")


def test_cli_teacher_resumes_and_embeds_the_gallery(tiny_mllm, easy_bench, tmp_path, capsys):
    out = tmp_path / "teacher"
    common = [
        "teacher",
        "--root",
        str(easy_bench),
        "--split",
        "val",
        "--model",
        tiny_mllm,
        "--device",
        "cpu",
        "--no-progress",
        "--batch-size",
        "3",
        "--max-new-tokens",
        "4",
    ]
    assert main([*common, "--mode", "full", "--limit", "4", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["embedded"] == 4
    assert main([*common, "--mode", "full", "--limit", "7", "--out", str(out)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["already_done"], r["embedded"]) == (4, 3)
    header, ids, emb = read_teacher_store(out)
    assert len(ids) == len(set(ids)) == 7 and emb.shape == (7, 64) and header["kind"] == "query"
    assert set(read_reasoning(out)) == set(ids)
    assert main([*common, "--gallery", "--limit", "5", "--out", str(tmp_path / "gal")]) == 0
    header, ids, _ = read_teacher_store(tmp_path / "gal")
    assert header["kind"] == "gallery" and header["mode"] == "fast" and len(ids) == 5
    code = main([*common, "--mode", "fast", "--limit", "2", "--out", str(out)])
    assert code == 2 and "holds mode='full'" in capsys.readouterr().err
