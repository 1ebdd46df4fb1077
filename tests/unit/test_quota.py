"""Block quotas per tenant: RESOURCE_EXHAUSTED past the quota, other tenants unaffected.

A coordinator over local CPU workers with quotas (its manager is a ``QuotaManager``);
outputs are checked against the dense oracle, so a refused call is seen to have
changed nothing. Block counts are exact (block size 4).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from service_fixtures import ATOL, LAYOUT, Shadow, make_handles

from kvservice.coordinator import Coordinator
from kvservice.core import errors
from kvservice.quotas import QuotaManager, check_quotas, parse_quotas


def make(
    quotas: dict[str, int], *, default: int | None = None, **options: Any
) -> tuple[Coordinator, QuotaManager]:
    handles = make_handles(num_gpu_blocks=64, num_cpu_blocks=64)
    coord = Coordinator(LAYOUT, handles, quotas=quotas, default_quota=default, **options)
    assert isinstance(coord.manager, QuotaManager)
    return coord, coord.manager


def used(coord: Coordinator) -> int:
    return sum(u.used for tiers in coord.manager.usage().values() for u in tiers.values())


def test_a_tenant_past_its_quota_is_refused_and_the_others_carry_on() -> None:
    coord, quotas = make({"alice": 6})
    shadow = Shadow()
    a = coord.create_sequence(list(range(16)), tenant="alice")  # 4 blocks
    shadow.prefill(coord, a.seq_id, 16, 0, tenant="alice")
    assert quotas.blocks_of("alice") == 4
    before = (used(coord), coord.get_sequence(a.seq_id, tenant="alice"))
    with pytest.raises(errors.ResourceExhausted, match="quota of 6"):
        coord.create_sequence(list(range(100, 112)), tenant="alice")  # 3 more: 7 > 6
    assert (used(coord), coord.get_sequence(a.seq_id, tenant="alice")) == before
    # Other tenants (bob has no quota, the default tenant neither) are not limited by it.
    b = coord.create_sequence(list(range(100, 140)), tenant="bob")
    shadow.prefill(coord, b.seq_id, 40, 0, tenant="bob")
    coord.create_sequence(list(range(200, 240)))
    # Two more blocks fit exactly; the sequence that holds them works as before.
    c = coord.create_sequence(list(range(300, 308)), tenant="alice")
    shadow.prefill(coord, c.seq_id, 8, 0, tenant="alice")
    assert quotas.blocks_of("alice") == 6
    assert quotas.usage_by_tenant() == {"alice": 6, "bob": 10, "default": 10}
    # Freeing gives the quota back.
    coord.free([c.seq_id], tenant="alice")
    assert coord.create_sequence(list(range(400, 408)), tenant="alice").num_blocks == 2
    coord.check_invariants()


def test_append_past_the_quota_is_refused_all_or_nothing() -> None:
    coord, quotas = make({"alice": 5})
    shadow = Shadow()
    s1 = coord.create_sequence(list(range(8)), tenant="alice")  # 2 blocks
    s2 = coord.create_sequence(list(range(50, 58)), tenant="alice")  # 2 blocks
    for info in (s1, s2):
        shadow.prefill(coord, info.seq_id, 8, 0, tenant="alice")
    # One block each would make 6: the whole batch is refused, neither sequence grew.
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        coord.append_tokens([s1.seq_id, s2.seq_id], [[1], [2]], tenant="alice")
    assert [coord.get_sequence(s, tenant="alice").length for s in (s1.seq_id, s2.seq_id)] == [8, 8]
    assert quotas.blocks_of("alice") == 4
    coord.append_tokens([s1.seq_id], [[1, 2, 3, 4]], tenant="alice")  # exactly the fifth
    for layer in range(LAYOUT.num_layers):
        out, expected = shadow.attend(coord, layer, [s1.seq_id], [4], [12], tenant="alice")
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    coord.check_invariants()


def test_forks_cost_nothing_until_a_copy_on_write_passes_the_quota() -> None:
    coord, quotas = make({"alice": 3})
    shadow = Shadow()
    parent = coord.create_sequence(list(range(6)), tenant="alice")  # 2 blocks, last half full
    shadow.prefill(coord, parent.seq_id, 6, 0, tenant="alice")
    first, second = coord.fork(parent.seq_id, 2, tenant="alice")
    shadow.fork(parent.seq_id, [first, second])
    assert quotas.blocks_of("alice") == 2  # every block shared
    # Rewriting the last position of a child copies its shared last block: a third block.
    for layer in range(LAYOUT.num_layers):
        out, expected = shadow.attend(coord, layer, [first], [1], [6], tenant="alice")
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    assert quotas.blocks_of("alice") == 3
    # The second child's copy would be a fourth: refused, and nothing was written.
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        shadow.attend(coord, 0, [second], [1], [6], tenant="alice")
    for sid in (parent.seq_id, second):
        out, expected = shadow.attend(coord, 1, [sid], [1], [6], write=False, tenant="alice")
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    # Another tenant's copy on write is not affected.
    bob = coord.create_sequence(list(range(6)), tenant="bob")
    shadow.prefill(coord, bob.seq_id, 6, 0, tenant="bob")
    (bob_child,) = coord.fork(bob.seq_id, 1, tenant="bob")
    shadow.fork(bob.seq_id, [bob_child])
    coord.append_tokens([bob_child], [[7]], tenant="bob")
    for layer in range(LAYOUT.num_layers):
        out, expected = shadow.attend(coord, layer, [bob_child], [1], [7], tenant="bob")
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    # Freeing the first child gives its copy back; then the second child's write fits.
    coord.free([first], tenant="alice")
    assert quotas.blocks_of("alice") == 2
    for layer in range(LAYOUT.num_layers):
        out, expected = shadow.attend(coord, layer, [second], [1], [6], tenant="alice")
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    assert quotas.blocks_of("alice") == 3
    # Appending into a shared, half-full last block copies it too: counted, refused.
    (third,) = coord.fork(second, 1, tenant="alice")
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        coord.append_tokens([third], [[9]], tenant="alice")
    assert coord.get_sequence(third, tenant="alice").length == 6
    coord.check_invariants()


def test_a_prefix_shared_with_a_live_sequence_is_not_counted_twice() -> None:
    coord, quotas = make({"alice": 5})
    shadow = Shadow()
    prompt = list(range(12))  # 3 blocks
    first = coord.create_sequence(prompt, tenant="alice")
    shadow.prefill(coord, first.seq_id, 12, 0, tenant="alice")
    # 13 tokens = 4 blocks, of which the first 3 are the live prefix: 1 new block (4 <= 5).
    second = coord.create_sequence([*prompt, 99], tenant="alice")
    assert second.num_cached_tokens == 12 and quotas.blocks_of("alice") == 4
    # A cached block revived by a hit counts again: free both, then the prompt's 3
    # cached blocks plus 3 new ones would be 6 > 5.
    coord.free([first.seq_id, second.seq_id], tenant="alice")
    assert quotas.blocks_of("alice") == 0
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        coord.create_sequence([*prompt, *range(100, 112)], tenant="alice")
    assert coord.create_sequence([*prompt, 7], tenant="alice").num_cached_tokens == 12
    coord.check_invariants()


def test_the_default_quota_applies_to_tenants_not_listed() -> None:
    coord, quotas = make({"big": 50}, default=2)
    coord.create_sequence(list(range(8)), tenant="small")
    with pytest.raises(errors.ResourceExhausted):
        coord.create_sequence([1], tenant="small")
    with pytest.raises(errors.ResourceExhausted):
        coord.create_sequence(list(range(12)))  # the default tenant too
    coord.create_sequence(list(range(40)), tenant="big")
    assert quotas.quota_of("big") == 50 and quotas.quota_of("other") == 2


def test_a_zero_quota_refuses_everything_that_allocates() -> None:
    coord, _ = make({"nobody": 0})
    with pytest.raises(errors.ResourceExhausted):
        coord.create_sequence([1, 2, 3], tenant="nobody")
    assert coord.lookup_prefix([1, 2, 3], tenant="nobody") == {}


def test_quota_specs_are_checked() -> None:
    assert parse_quotas(["alice=10", " bob = 0"]) == {"alice": 10, "bob": 0}
    for bad in (["alice"], ["=3"], ["alice=-1"], ["alice=x"]):
        with pytest.raises(errors.InvalidArgument):
            parse_quotas(bad)
    with pytest.raises(errors.InvalidArgument):
        check_quotas({"alice": -1}, None)
    with pytest.raises(errors.InvalidArgument):
        check_quotas({}, True)  # type: ignore[arg-type]


def test_every_segment_of_a_long_sequence_counts_for_its_tenant() -> None:
    coord, quotas = make({"alice": 10}, segment_tokens=16)  # segments of 4 blocks
    shadow = Shadow()
    info = coord.create_sequence(list(range(40)), tenant="alice")  # 10 blocks in 3 segments
    shadow.prefill(coord, info.seq_id, 40, 0, tenant="alice")
    assert quotas.blocks_of("alice") == 10 and quotas.usage_by_tenant() == {"alice": 10}
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        coord.append_tokens([info.seq_id], [[1]], tenant="alice")  # an 11th block
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        coord.create_sequence([1, 2], tenant="alice")
    coord.create_sequence(list(range(40)), tenant="bob")
    coord.truncate(info.seq_id, 36, tenant="alice")
    coord.append_tokens([info.seq_id], [[1]], tenant="alice")  # fits again
    assert quotas.blocks_of("alice") == 10
    coord.check_invariants()


def test_serve_takes_quotas_from_the_command_line() -> None:
    from kvservice import cli

    args = cli.build_parser().parse_args(
        ["serve", "--quota", "alice=10", "--quota", "bob=0", "--default-quota", "3"]
    )
    options = cli.service_options(args)
    assert (options["quotas"], options["default_quota"]) == ({"alice": 10, "bob": 0}, 3)
    assert "quotas" not in cli.service_options(cli.build_parser().parse_args(["serve"]))
