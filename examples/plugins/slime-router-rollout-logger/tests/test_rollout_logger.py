"""The rollout logger, tested with slime-router's pytest fixtures only (``slime_router``, ``slime_mock_worker``):
what it writes is compared with the mock worker's records of what it really received and generated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def lines(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("rollouts-*.jsonl")) for line in f.read_text().splitlines()]


def test_every_finished_trajectory_is_one_jsonl_line_with_its_exact_tokens(slime_router, slime_mock_worker, tmp_path):
    slime_mock_worker.configure(weight_version="v7")
    r = slime_router(plugins=["rollout_logger", "radix_tree"], extra_settings={"rollout_logger_dir": str(tmp_path)})
    assert "rollout_logger" in r.plugins()
    first = r.client.post("/generate", json={"text": "Q: hi\nA:"}, headers={"X-Episode-ID": "ep-1"}).json()
    prompt2 = "Q: hi\nA:" + first["text"] + "\nQ: and then?\nA:"
    r.client.post("/generate", json={"text": prompt2}, headers={"X-Episode-ID": "ep-1", "X-Reward-ID": "r9"})
    truth = slime_mock_worker.records()
    got = lines(tmp_path)
    assert len(got) == 2 == len(truth)
    for line, rec in zip(got, truth):
        assert line["tokens"] == rec["input_ids"] + rec["output_ids"]  # what went upstream + what came back
        n = len(rec["output_ids"])
        assert line["loss_mask"][-n:] == [1] * n
        assert line["rollout_logp"][-n:] == pytest.approx(rec["output_logprobs"], abs=1e-6)  # kept as float32
        assert line["weight_versions"][-n:] == ["v7"] * n
        assert line["source"] == "trajectory_cache"
    assert got[0]["metadata"] == {"x-episode-id": "ep-1"}
    assert got[1]["metadata"] == {"x-episode-id": "ep-1", "x-reward-id": "r9"}
    # turn 2 carries turn 1 as recorded: its generated tokens keep mask 1 and their logprobs
    n1 = len(got[0]["tokens"])
    assert got[1]["tokens"][:n1] == got[0]["tokens"]
    assert got[1]["loss_mask"][:n1] == got[0]["loss_mask"]
    assert got[1]["rollout_logp"][:n1] == got[0]["rollout_logp"]
    r.stop()  # shutdown closes the file: every line is on disk
    assert len(lines(tmp_path)) == 2


def test_files_rotate_by_size_and_no_line_is_lost_or_split(slime_router, tmp_path):
    r = slime_router(plugins=["rollout_logger", "radix_tree"],
                     extra_settings={"rollout_logger_dir": str(tmp_path), "rollout_logger_max_bytes": 1500})
    for i in range(8):
        assert r.client.post("/generate", json={"text": f"Q: number {i}?\nA:"}).status_code == 200
    files = sorted(tmp_path.glob("rollouts-*.jsonl"))
    assert len(files) > 1
    assert all(f.stat().st_size <= 1500 or len(f.read_text().splitlines()) == 1 for f in files)
    assert len(lines(tmp_path)) == 8  # every line parses: none split across files


def test_without_a_trajectory_cache_the_reply_is_logged_and_the_client_gets_no_logprobs_it_did_not_ask_for(
        slime_router, slime_mock_worker, slime_tokenizer, tmp_path):
    r = slime_router(plugins=["rollout_logger"], extra_settings={"rollout_logger_dir": str(tmp_path)})
    ids = slime_tokenizer.encode("Q: hi\nA:")
    reply = r.client.post("/generate", json={"input_ids": ids}, headers={"x-episode-id": "e2"}).json()
    assert "output_token_logprobs" not in reply["meta_info"]
    (line,) = lines(tmp_path)
    (rec,) = slime_mock_worker.records()
    assert line["source"] == "reply" and line["metadata"] == {"x-episode-id": "e2"}
    assert line["tokens"] == ids + rec["output_ids"] and rec["input_ids"] == ids
    assert line["loss_mask"] == [0] * len(ids) + [1] * len(rec["output_ids"])
    assert line["rollout_logp"][len(ids):] == pytest.approx(rec["output_logprobs"], abs=1e-6)
