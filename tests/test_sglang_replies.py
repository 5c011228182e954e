"""slime_router_core.sglang: the three streaming variants merge to the same reply."""

from slime_router_core.sglang import merge_stream, output_ids_and_logprobs, split_by_index, weight_version_spans

IDS = [11, 22, 22, 151645]
LPS = [-0.1, -0.2, -0.3, -0.4]
TEXTS = ["a", "b", "b", ""]
TRIPLES = [[lp, i, None] for lp, i in zip(LPS, IDS)]


def _meta(n: int, final: bool, triples):
    return {"completion_tokens": n, "finish_reason": {"type": "stop", "matched": 151645} if final else None,
            "output_token_logprobs": triples, "weight_version": "3"}


def cumulative():
    return [{"text": "".join(TEXTS[: k + 1]), "output_ids": IDS[: k + 1],
             "meta_info": _meta(k + 1, k == 3, TRIPLES[: k + 1])} for k in range(4)]


def incremental():
    return [{"text": TEXTS[k], "output_ids": IDS[k: k + 1], "meta_info": _meta(k + 1, k == 3, TRIPLES[k: k + 1])}
            for k in range(4)]


def legacy():
    return [{"text": "".join(TEXTS[: k + 1]), "output_ids": IDS[k: k + 1],
             "meta_info": _meta(k + 1, k == 3, TRIPLES[: k + 1])} for k in range(4)]


def test_all_variants_merge_to_the_same_reply():
    for chunks in (cumulative(), incremental(), legacy()):
        merged = merge_stream(chunks)
        assert merged["text"] == "abb"
        assert merged["output_ids"] == IDS
        assert output_ids_and_logprobs(merged) == (IDS, LPS)
        assert merged["meta_info"]["finish_reason"]["matched"] == 151645


def test_repeated_delta_tokens_are_not_mistaken_for_cumulative():
    # deltas [22], [22] look like prefixes of each other; completion_tokens disambiguates
    chunks = incremental()
    merged = merge_stream(chunks)
    assert merged["output_ids"].count(22) == 2


def test_logprob_ids_preferred_over_output_ids():
    obj = {"output_ids": [1, 2, 5, 6], "meta_info": {"output_token_logprobs": [[-1.0, 5, None], [-2.0, 6, None]]}}
    assert output_ids_and_logprobs(obj) == ([5, 6], [-1.0, -2.0])
    assert output_ids_and_logprobs({"output_ids": [7]}) == ([7], [None])


def test_weight_version_spans_are_strings_per_token():
    obj = {"meta_info": {"weight_version": "v2", "weight_versions": [
        {"version": "v1", "start": 0, "end": 2}, {"version": "v2", "start": 2, "end": 3}]}}
    assert weight_version_spans(obj, 3) == ["v1", "v1", "v2"]
    assert weight_version_spans({"meta_info": {}}, 2) == ["default", "default"]
    assert weight_version_spans({"meta_info": {"weight_version": 3}}, 1) == ["3"]


def test_split_by_index():
    chunks = [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}, {"index": 0, "text": "ac"}]
    groups = split_by_index(chunks)
    assert [c["text"] for c in groups[0]] == ["a", "ac"] and [c["text"] for c in groups[1]] == ["b"]
