"""MCoT captioning without an MLLM: templates and parsing, the store, resume, shards, merge, the CLI."""

import json
import subprocess
import sys

import pytest

from csmcir.captioning import CaptionStore, load_template, merge_stores, read_store, select_ids
from csmcir.captioning.prompts import NATURAL
from csmcir.data.custom import read_captions
from csmcir.errors import CsmcirError


def test_prompt_asks_for_every_level_then_the_final_caption():
    p = load_template("fashion").prompt()
    order = [p.index(label + ":") for label in ("Category", "Parts", "Attributes", "Context", "Final")]
    assert order == sorted(order) and "colour" in p and "text or logo" in p


def test_parse_reads_a_compliant_answer_and_tolerates_markdown_and_wrapping():
    t = NATURAL
    raw = t.render(
        {"scene": "a park", "objects": "two dogs", "attributes": "brown, fluffy", "relations": "on grass"}, "two brown dogs on grass"
    )
    assert t.parse(raw).levels["objects"] == "two dogs" and t.parse(raw).final == "two brown dogs on grass"
    assert t.parse(raw).status == "ok"
    messy = (
        "Sure! Here it is.\n**1. Scene:** a busy street\n- **Objects**: a red bus\n  and a taxi\n"
        'Final caption: "a red double-decker bus beside a taxi"\n'
    )
    got = t.parse(messy)
    assert got.levels == {"scene": "a busy street", "objects": "a red bus and a taxi"}
    assert got.final == "a red double-decker bus beside a taxi" and got.status == "partial"


def test_an_answer_without_the_format_keeps_its_raw_text_as_the_final_caption():
    got = NATURAL.parse("  A photo of a cat\n sitting on a sofa. ")
    assert (got.status, got.final, got.levels) == ("unparsed", "A photo of a cat sitting on a sofa.", {})
    assert NATURAL.parse(" \n ").status == "empty"


def test_user_template_from_yaml(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("name: shoes2\nversion: '3'\nlevels:\n  - {key: kind, label: Kind, ask: the shoe kind}\nfinal_ask: one sentence\n")
    t = load_template(str(f))
    assert t.id == "shoes2@3" and t.parse("1. Kind: boot\nFinal: a black boot").levels == {"kind": "boot"}
    f.write_text("name: x\nlevels: []\n")
    with pytest.raises(CsmcirError, match="t.yaml: not a prompt template"):
        load_template(str(f))
    with pytest.raises(CsmcirError, match="unknown prompt template 'nope'"):
        load_template("nope")


def _rec(i, final="a cat", status="ok"):
    return {"image_id": i, "levels": {"scene": "s"}, "final": final, "status": status, "raw": final, "model": "m", "prompt": "natural@1"}


def test_store_appends_resumes_and_repairs_a_truncated_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    with CaptionStore(path) as s:
        s.append([_rec("a"), _rec("b")])
    with open(path, "ab") as f:
        f.write(b'{"image_id": "c", "levels": {}, "fin')  # a writer killed mid-line
    with pytest.raises(CsmcirError, match="last line is truncated"):
        read_store(path)
    with pytest.warns(UserWarning, match="cut off a truncated last line"):
        s = CaptionStore(path).open()
    assert s.done() == {"a", "b"}
    s.append([_rec("c")])
    with pytest.raises(CsmcirError, match="image id 'a' is already in the store"):
        s.append([_rec("a")])
    s.close()
    assert list(read_store(path)) == ["a", "b", "c"]
    # the store is a captions.jsonl; an empty answer counts as no caption there
    with CaptionStore(path) as s:
        s.append([_rec("d", final="", status="empty")])
    caps = read_captions(path)
    assert sorted(caps) == ["a", "b", "c"] and caps["a"].final == "a cat"


def test_shards_partition_the_ids_and_merge_refuses_conflicts(tmp_path):
    ids = [f"i{k}" for k in range(10)]
    shards = [select_ids(ids, (k, 3)) for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(ids) and select_ids(ids, (1, 3), limit=2) == ["i1", "i4"]
    for k, part in enumerate(shards):
        with CaptionStore(tmp_path / f"s{k}.jsonl") as s:
            s.append([_rec(i) for i in part])
    with CaptionStore(tmp_path / "dup.jsonl") as s:  # an identical re-run of one id is fine
        s.append([_rec("i0")])
    out = tmp_path / "all.jsonl"
    stats = merge_stores(out, [tmp_path / f"s{k}.jsonl" for k in range(3)] + [tmp_path / "dup.jsonl"])
    assert stats == {"records": 10, "shards": 4, "duplicates": 1} and sorted(read_store(out)) == sorted(ids)
    with CaptionStore(tmp_path / "bad.jsonl") as s:
        s.append([_rec("i3", final="a dog")])
    with pytest.raises(CsmcirError, match="'i3' has different captions in .*s0.jsonl and .*bad.jsonl"):
        merge_stores(tmp_path / "m2.jsonl", [tmp_path / "s0.jsonl", tmp_path / "bad.jsonl"])
    assert not (tmp_path / "m2.jsonl").exists()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "csmcir.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_synthetic_captions_shards_resume_and_train_reads_the_store(easy_bench, tmp_path):
    from csmcir.captioning import split_image_ids
    from csmcir.data.custom import CustomCIR

    ids = split_image_ids(CustomCIR(easy_bench), "val")
    base = ["caption", "--root", str(easy_bench), "--split", "val", "--backend", "synthetic", "--no-progress"]
    r = _cli(*base, "--out", str(tmp_path / "s0.jsonl"), "--shard", "0/2", "--limit", "5")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["captioned"] == 5
    r = _cli(*base, "--out", str(tmp_path / "s0.jsonl"), "--shard", "0/2")  # resume: the first 5 are skipped
    assert json.loads(r.stdout)["already_done"] == 5
    assert _cli(*base, "--out", str(tmp_path / "s1.jsonl"), "--shard", "1/2").returncode == 0
    r = _cli("caption-merge", "--out", str(tmp_path / "all.jsonl"), str(tmp_path / "s0.jsonl"), str(tmp_path / "s1.jsonl"))
    assert r.returncode == 0, r.stderr
    caps = read_captions(tmp_path / "all.jsonl")
    assert sorted(caps) == sorted(ids)
    assert set(caps[ids[0]].levels) == {"scene", "objects", "attributes", "relations"}
    # the datamodule trains and evaluates from the store
    from csmcir.data.datamodule import CIRDataModule

    dm = CIRDataModule(root=str(easy_bench), synthetic=False, captions=str(tmp_path / "all.jsonl"), val_split="val")
    assert dm.dataset().captions()[ids[0]].final == caps[ids[0]].final
    # bad input: one line, exit 2, the store untouched
    before = (tmp_path / "all.jsonl").read_bytes()
    r = _cli("caption", "--root", str(easy_bench), "--split", "val", "--backend", "transformers", "--out", str(tmp_path / "all.jsonl"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--model" in r.stderr
    r = _cli(*base, "--out", str(tmp_path / "all.jsonl"), "--template", "fashion")
    assert r.returncode == 2 and "prompt natural@1" in r.stderr
    assert (tmp_path / "all.jsonl").read_bytes() == before
