"""Placement planning and budgets (pure code) against hand-computed values."""

import json
import types

import pytest

from vllm_fiddler.config import FiddlerConfig, FiddlerConfigError
from vllm_fiddler.placement import (
    GIB,
    MoEShape,
    Placement,
    auto_expert_budget_bytes,
    load_placement_file,
    placement_from_mapping,
    plan_even,
    resolve_placement,
)

MIXTRAL_8X7B = types.SimpleNamespace(
    hidden_size=4096, num_hidden_layers=32, num_local_experts=8, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=32000, intermediate_size=14336,
    num_experts_per_tok=2, tie_word_embeddings=False)


def test_mixtral_8x7b_sizes():
    shape = MoEShape.from_hf_config(MIXTRAL_8X7B, dtype_bytes=2)
    assert shape.expert_bytes == 3 * 4096 * 14336 * 2  # 352 MB
    assert shape.all_experts_bytes == 256 * shape.expert_bytes  # 90.2 GB
    # Mixtral-8x7B has 46.7B parameters, 45.1B of them in experts: 1.6B other.
    total_params = (shape.all_experts_bytes + shape.non_expert_bytes) / 2
    assert 46.6e9 < total_params < 46.8e9
    assert shape.kv_bytes_per_token == 128 * 1024  # 2 * 32 layers * 8 heads * 128 * 2 B


@pytest.mark.parametrize("n, expected", [
    (0, [0, 0, 0]), (1, [1, 0, 0]), (4, [2, 1, 1]), (6, [2, 2, 2]), (100, [4, 4, 4])])
def test_plan_even_spreads_across_layers(n, expected):
    p = plan_even(num_layers=3, num_experts=4, num_gpu_experts=n)
    assert [len(g) for g in p.gpu_experts] == expected
    assert p.num_gpu == sum(expected) and p.num_cpu == 12 - sum(expected)
    for layer in range(3):
        assert sorted(p.on_gpu(layer) + p.on_cpu(layer)) == [0, 1, 2, 3]


def test_file_formats(tmp_path):
    as_list = placement_from_mapping({"gpu_experts": [[3, 1], [], [0]]}, 3, 4)
    as_dict = placement_from_mapping({"gpu_experts": {"0": [1, 3], "2": [0]}}, 3, 4)
    assert as_list == as_dict == Placement(4, ((1, 3), (), (0,)))
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"gpu_experts": [[3, 1], [], [0]]}))
    assert load_placement_file(str(f), 3, 4) == as_list


@pytest.mark.parametrize("data, words", [
    ({"gpu_experts": [[0, 8]]}, ["expert 8", "does not exist", "0..7"]),
    ({"gpu_experts": {"5": [0]}}, ["layer 5 is not an MoE layer", "0-2"]),
    ({"gpu_experts": [[0], [1], [2], [3], [4], [5]]}, ["6 layers", "has 3"]),
    ({"gpu_experts": [[1, 1]]}, ["twice"]),
    ({"gpu_experts": [["a"]]}, ["'a'"]),
    ({"gpu_experts": {"x": [0]}}, ["not an integer"]),
    ({"experts": []}, ["gpu_experts"]),
])
def test_bad_placement_files(data, words):
    with pytest.raises(FiddlerConfigError) as e:
        placement_from_mapping(data, layers=3, num_experts=8)
    for w in words:
        assert w in str(e.value)


def test_unreadable_file(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(FiddlerConfigError, match="cannot read"):
        load_placement_file(str(f), 3, 8)


def test_resolve_even_uses_budget():
    shape = MoEShape.from_hf_config(MIXTRAL_8X7B, dtype_bytes=2)
    placement, source = resolve_placement(FiddlerConfig(), shape, budget_bytes=10 * shape.expert_bytes + 5)
    assert placement.num_gpu == 10 and "even" in source
    assert resolve_placement(FiddlerConfig(), shape, budget_bytes=-1)[0].num_gpu == 0


def test_resolve_file_must_fit_budget(tmp_path):
    shape = MoEShape.from_hf_config(MIXTRAL_8X7B, dtype_bytes=2)
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"gpu_experts": {"0": [0, 1, 2]}}))
    cfg = FiddlerConfig(placement=str(f))
    assert resolve_placement(cfg, shape, 3 * shape.expert_bytes)[0].on_gpu(0) == (0, 1, 2)
    with pytest.raises(FiddlerConfigError, match="puts 3 experts"):
        resolve_placement(cfg, shape, 2 * shape.expert_bytes)


def test_auto_budget_for_a_24gb_gpu():
    # An 80 GB H100 at gpu_memory_utilization 0.30 acts like a 24 GB GPU.
    shape = MoEShape.from_hf_config(MIXTRAL_8X7B, dtype_bytes=2)
    budget = auto_expert_budget_bytes(gpu_total_bytes=80 * GIB, gpu_memory_utilization=0.30,
                                      non_expert_bytes=shape.non_expert_bytes, kv_reserve_bytes=2 * GIB)
    assert budget == int(24 * GIB) - shape.non_expert_bytes - 2 * GIB
    assert 50 <= budget // shape.expert_bytes <= 60  # ~20% of Mixtral's 256 experts


def test_report_names_every_layer():
    text = Placement(8, ((0, 1), (), (7,))).report(expert_bytes=GIB, source="test")
    assert "3/24 experts on GPU = 3.00 GiB" in text and "21 on CPU = 21.00 GiB" in text
    assert "2/8:[0,1]" in text and "0/8:[]" in text and "1/8:[7]" in text


def test_placement_files_address_moe_layers_by_model_index():
    """DeepSeek-like: layers 0-2 dense. The object form keys by model layer index, the list
    form lists MoE layers in order; both give the same placement."""
    by_index = placement_from_mapping({"gpu_experts": {"3": [0, 1], "5": [7]}}, layers=(3, 4, 5), num_experts=8)
    by_order = placement_from_mapping({"gpu_experts": [[0, 1], [], [7]]}, layers=(3, 4, 5), num_experts=8)
    assert by_index == by_order and by_index.gpu_experts == ((0, 1), (), (7,))
    with pytest.raises(FiddlerConfigError, match=r"layer 0 is not an MoE layer .*3-5"):
        placement_from_mapping({"gpu_experts": {"0": [1]}}, layers=(3, 4, 5), num_experts=8)


def test_report_labels_rows_with_model_layers_and_folds_ranges():
    p = Placement(512, (tuple(range(64)), (), (0, 1, 7)))
    text = p.report(1 << 20, "test", layer_ids=(3, 4, 5))
    assert "   3-5  | 64/512:[0-63] 0/512:[] 3/512:[0,1,7]" in text
