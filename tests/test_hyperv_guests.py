"""Real-guest tests of the Hyper-V interface: one C guest per feature group under guests/programs/hv_*.c.

Each guest prints ``ok <name>`` or ``FAIL <name>: got X want Y`` per check and exits through
isa-debug-exit with 0 when every check passed. The tests assert the exit status, that no check
failed, and that the checks that matter for the issue actually ran.
"""

from __future__ import annotations

import re

import pytest
from vsmtrace.vmm.hyperv.cpuid import HypervPolicy, hyperv_cpuid_leaves

from tests.conftest import RunResult

pytestmark = pytest.mark.kvm

STATUS_GUEST_OK = 1  # isa-debug-exit 0 -> (0 << 1) | 1
EXIT_GUEST_FAULT = 4  # vsmtrace: crash MSRs, triple fault ...


def run_guest(guest, vsmtrace, name: str, *args: str, timeout: float = 60) -> RunResult:  # type: ignore[no-untyped-def]
    kernel = guest(name)
    return vsmtrace(["run", "--timeout", str(timeout), *args, str(kernel)], timeout=timeout + 30)


def oks(result: RunResult) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^ok (\S+)$", result.stdout, re.M)}


def assert_passed(result: RunResult, *required: str) -> set[str]:
    """Exit status 0 from the guest, no FAIL line, and every ``required`` check reported ok."""
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert not fails, f"failed checks: {fails}\nstderr: {result.stderr[-2000:]}"
    assert result.status == STATUS_GUEST_OK, f"status {result.status}\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
    assert "PASSED: 0 failed" in result.stdout
    done = oks(result)
    missing = [name for name in required if name not in done]
    assert not missing, f"checks that did not run: {missing}"
    return done


# -- CPUID -------------------------------------------------------------------------------------


def _leaves_seen(stdout: str) -> dict[int, tuple[int, int, int, int]]:
    out = {}
    for m in re.finditer(r"^leaf 0x([0-9a-f]+): eax=0x([0-9a-f]+) ebx=0x([0-9a-f]+) ecx=0x([0-9a-f]+) edx=0x([0-9a-f]+)$",
                         stdout, re.M):  # fmt: skip
        out[int(m.group(1), 16)] = tuple(int(m.group(i), 16) for i in range(2, 6))
    return out  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("smp", "disabled", "vsm"),
    [(1, [], True), (1, [], False), (2, ["xmm-input", "stimers"], True), (1, ["synic", "pv-ipi"], False)],
)
def test_cpuid_leaves_match_policy(kvm, guest, vsmtrace, smp: int, disabled: list[str], vsm: bool) -> None:  # type: ignore[no-untyped-def]
    """What the guest reads from CPUID is exactly what the policy (CLI switches) advertises."""
    args = [
        "--smp",
        str(smp),
        "--append",
        f"cpus={smp} xmm_input={int('xmm-input' not in disabled)} synic={int('synic' not in disabled)}",
    ]
    args.append("--vsm" if vsm else "--no-vsm")
    for name in disabled:
        args += ["--hv-disable", name]
    r = run_guest(guest, vsmtrace, "hv_cpuid", *args)
    assert_passed(r, "hypervisor_bit", "max_leaf", "vendor", "interface_hv1", "feature_xmm_input", "max_vps")
    seen = _leaves_seen(r.stdout)
    policy = HypervPolicy.from_switches(disabled)
    if vsm:
        policy = policy.with_vsm()
    expected = {leaf: (a, b, c, d) for leaf, _sub, a, b, c, d in hyperv_cpuid_leaves(policy, smp)}
    assert sorted(seen) == list(range(0x40000000, 0x4000000B))
    assert seen == expected


def test_cpuid_without_hyperv(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_cpuid", "--no-hyperv", "--append", "expect=none")
    assert_passed(r, "hypervisor_bit_clear", "hv_absent", "guest_os_id_gp")


# -- MSRs and the hypercall page -----------------------------------------------------------------


def test_synthetic_msrs(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_msr")
    assert_passed(
        r,
        "hypercall_enable_stays_clear",
        "hypercall_page_untouched",
        "hypercall_page_written",
        "os_id_zero_disables_page",
        "call_disabled_page_ud",
        "ud_rip_at_trap_instruction",
        "vp_index_readonly",
        "time_ref_count_readonly",
        "eoi_write_only",
        "stimer_config_reserved",
        "sint_vector_below_16",
        "crash_ctl_reserved",
        "vp_runtime_unadvertised",
        "unknown_0x400001ff",
        "hypercall_gpa_outside_ram",
        "hypercall_locked_write",
    )


def test_unadvertised_msrs_fault(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    """With the crash MSRs hidden, the guest's first RDMSR of CRASH_CTL takes #GP."""
    r = run_guest(guest, vsmtrace, "hv_crash", "--hv-disable", "crash-msrs")
    assert "EXCEPTION 13 " in r.stdout
    assert r.guest_exit_code == 0x40 + 13


# -- hypercall ABI -------------------------------------------------------------------------------


def test_hypercall_abi(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_hypercall")
    assert "hypercall test xmm=on" in r.stdout
    assert_passed(
        r,
        # status codes for bad control words
        "unknown_code_0xfe",
        "unknown_code_fast",
        "unimplemented_create_partition",
        "reserved_bit_27",
        "reserved_bit_44",
        "reserved_bit_60",
        "nested_bit",
        "rep_count_on_simple_call",
        "rep_call_zero_count",
        "rep_start_equals_count",
        "var_header_on_fixed_call",
        # memory GPAs
        "output_misaligned",
        "input_misaligned",
        "input_crosses_page",
        "output_crosses_page_by_4",
        "input_output_overlap",
        "output_outside_ram",
        "input_outside_ram",
        # calls
        "get_partition_id_value",
        "get_partition_id_fast_rdx",
        "spin_wait_memory",
        "spin_wait_fast",
        "vp_index_from_apic_id_value",
        "bad_partition_id",
        "input_vtl_higher_than_caller",
        # rep calls
        "bad_apic_id_reps_completed",
        "continuation_reps",
        "rep_start_element0_untouched",
        "flush_list_reps",
        # XMM fast input/output
        "xmm_vp_index_status",
        "xmm_output_in_xmm1",
        "xmm_unused_registers_preserved",
        "xmm_rep_start_output",
        "xmm_input_too_large",
        "xmm_flush_ex_status",
    )


def test_xmm_input_disabled_is_ud(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_hypercall", "--hv-disable", "xmm-input", "--append", "xmm=off")
    assert "hypercall test xmm=off" in r.stdout
    assert_passed(r, "xmm_input_disabled_ud", "xmm_input_disabled_ud_rip", "xmm_input_disabled_flush_ex_ud",
                  "register_fast_call_still_ok")  # fmt: skip


# -- time ----------------------------------------------------------------------------------------


def test_reference_time_and_tsc_page(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_time")
    assert_passed(r, "ref_time_10mhz_within_1pct", "tsc_page_sequence_valid", "tsc_page_scale_matches_frequency",
                  "tsc_page_between_msr_reads", "tsc_page_10mhz_within_1pct", "moved_tsc_page_new_sequence")  # fmt: skip
    ppm = int(re.search(r"^ref_ratio_ppm=(\d+)$", r.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert 990_000 <= ppm <= 1_010_000, f"TIME_REF_COUNT runs at {ppm / 1e4:.3f}% of 10 MHz by the TSC"
    m = re.search(r"^tsc_hz=\d+ tsc_delta=(\d+) ref_delta=(\d+)$", r.stdout, re.M)
    assert m is not None
    assert int(m.group(2)) >= 900_000  # the guest really measured ~100 ms


def test_synthetic_timers(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_stimer")
    assert_passed(
        r,
        "oneshot_expiration_time",
        "oneshot_not_early",
        "oneshot_on_time",
        "oneshot_enable_cleared",
        "oneshot_fired_once",
        "periodic_intervals_are_periods",
        "periodic_tick4_not_early",
        "periodic_stopped",
        "direct_oneshot_not_early",
        "direct_oneshot_on_time",
        "direct_periodic_never_early",
        "sint0_message_timer_disabled",
        "auto_enable_fired",
        "past_deadline_fired",
        "count_zero_disables",
    )


# -- SynIC ---------------------------------------------------------------------------------------


def test_synic_messages_and_events(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_synic")
    assert_passed(
        r,
        "message_origination_id",
        "message_pending_set",
        "no_redelivery_without_eom",
        "redelivery_after_eom",
        "redelivery_interrupt",
        "seventeenth_insufficient_buffers",
        "drained_in_order",
        "auto_eoi_two_interrupts",
        "polling_no_interrupt",
        "unknown_connection",
        "event_connection_for_message",
        "message_type_hypervisor",
        "payload_too_large",
        "post_simp_disabled",
        "signal_flag_set",
        "signal_again_no_interrupt",
        "signal_flag_out_of_range",
        "signal_message_connection",
        "signal_reserved_nonzero",
        "signal_masked_sint",
    )


def test_synic_calls_need_privileges(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_synic", "--hv-disable", "post-messages", "--hv-disable", "signal-events",
                  "--append", "privileges=off")  # fmt: skip
    assert_passed(r, "post_message_denied", "signal_event_denied")


# -- PV IPIs and TLB flushes -----------------------------------------------------------------------


@pytest.mark.parametrize("cpus", [3, 4])
def test_pv_ipis(kvm, guest, vsmtrace, cpus: int) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_ipi", "--smp", str(cpus), "--append", f"cpus={cpus}")
    assert_passed(r, "ap_vp_index", "ap_hypercalls", "apic_id_to_vp_index_all", "ipi_single_vp1", "ipi_multi_vps",
                  "ipi_ex_sparse_vps", "ipi_ex_all_vps", "ipi_vector_too_low", "ipi_target_vtl_higher")  # fmt: skip


def test_tlb_flush_makes_pte_change_visible(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_tlbflush", "--smp", "2")
    assert_passed(r, "vp1_reads_a", "flush_space_vp1_sees_b", "flush_list_vp1_sees_a", "flush_space_ex_vp1_sees_b",
                  "flush_space_fast_vp1_sees_a")  # fmt: skip


# -- crash MSRs ----------------------------------------------------------------------------------


def test_crash_msrs_stop_the_guest(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_crash")
    assert "ok crash_ctl_capabilities" in r.stdout and "ok crash_ctl_reserved_gp" in r.stdout
    assert "crashing now (message=1)" in r.stdout
    assert "FAIL" not in r.stdout
    assert r.status == EXIT_GUEST_FAULT, (r.status, r.stderr)
    assert "guest crash reported on VP0 VTL0" in r.stderr
    assert "P0=0xdead0001 P1=0x1111 P2=0x2222" in r.stderr
    assert "message='hv_crash: deliberate test crash'" in r.stderr


def test_crash_msrs_without_message(kvm, guest, vsmtrace) -> None:  # type: ignore[no-untyped-def]
    r = run_guest(guest, vsmtrace, "hv_crash", "--append", "message=0")
    assert r.status == EXIT_GUEST_FAULT
    assert "P3=0x3333 P4=0x4444 CTL=0x8000000000000000" in r.stderr
    assert "message=" not in r.stderr.split("CTL=")[1]
