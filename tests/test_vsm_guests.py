"""Two-VTL guests on real KVM: enablement, shared/private state, interrupts, protections, translation,
confused deputy, TLB lock, SMP.

Each guest (guests/programs/vsm_*.c, framework in guests/runtime/vsm.{h,c}) prints one
``ok <check>`` or ``FAIL <check>: ...`` line per check and exits 0 only if every check
passed. The tests assert the exit status and that every expected check printed ``ok``, so a
guest that dies early, hangs (``--timeout``) or skips checks fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import run_vsmtrace
from tests.guests import build_guest

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs the system gcc")

GUEST_TIMEOUT = 60  # seconds inside vsmtrace (--timeout); the subprocess gets a little more
OK = re.compile(r"^ok (\S+)", re.M)
FAIL = re.compile(r"^FAIL ([^\s:]+)", re.M)

# Checks each guest must report as ok (a representative, stable subset per area; the
# guest's exit status covers the rest).
EXPECTED: dict[str, list[str]] = {
    "vsm_enable": [
        "cpuid_access_vsm", "code_page_offsets_point_at_code", "vtl_call_before_enable_ud",
        "vtl_return_from_vtl0_ud", "enable_partition_vtl_bad_partition", "partition_status_enabled_set",
        "enable_vp_vtl_bad_vp", "enable_vp_vtl_again", "vp_status_enabled_set", "first_vtl_call_reaches_vtl1",
        "entry_reason_vtl_call", "vtl1_vp_status_active_vtl", "vtl0_get_vtl1_register_denied",
        "vtl1_protect_before_enable_protection", "partition_config_protection_write_once", "vtl1_protect_non_ram",
        "enable_partition_vtl_reserved_bytes",
    ],
    "vsm_state": [
        "shared_to_vtl1_rbx", "shared_to_vtl1_r15", "shared_to_vtl1_xmm15", "shared_to_vtl0_rdx",
        "shared_to_vtl0_xmm0", "nonfast_return_rax", "nonfast_return_rcx", "fast_return_rax_not_reloaded",
        "fast_return_rcx_not_reloaded", "fast_return_shared_r12", "private_msr_lstar_vtl0",
        "private_msr_lstar_vtl1", "private_idtr", "shared_cr2_to_vtl1", "shared_cr2_to_vtl0",
        "private_cr8", "private_simp", "private_hypercall_msr", "shared_vp_index",
    ],
    "vsm_interrupts": [
        "vtl0_self_ipi_before_vsm", "timer_hlt_if0_fired", "timer_hlt_if0_entry_reason", "timer_hlt_if0_regs_intact",
        "timer_hlt_if0_vtl0_still_if0", "pv_ipi_vtl0_to_vtl1_delivered", "pv_ipi_vtl1_self_delivered",
        "pv_ipi_to_vtl0_status", "pv_ipi_to_vtl0_delivered", "pv_ipi_bad_vector", "vtl1_tpr_holds_interrupt",
        "vtl1_tpr_held_across_return", "vtl1_tpr_no_switch", "vtl1_tpr_release_delivers",
        "apic_self_ipi_vtl1_delivered", "apic_self_ipi_stays_in_vtl1", "apic_self_ipi_stays_in_vtl0",
    ],
    "vsm_protect": [
        f"{mask}_{access}_{what}"
        for mask in ("none", "r", "rw", "rx", "rwx")
        for access in ("read", "write", "push", "movsb_w", "movsb_r", "add")
        for what in ("intercepts", "result")
    ]
    + [f"{mask}_exec_{what}" for mask in ("none", "r", "rw", "rx", "rwx") for what in ("intercepts", "result")]
    + [
        "none_read_message", "r_write_message", "r_push_message", "rx_movsb_w_message", "none_exec_message",
        "skip_write_no_effect", "emulate_read_value", "inject_gp_seen", "inject_gp_error_code",
        "inject_ud_seen", "set_rip_exec_recovers",
    ],
    "vsm_vina": [
        "vina_notified_once", "vina_asserted_seen_by_handler", "vtl0_interrupt_after_return",
        "vina_auto_reset", "vina_disabled_no_notification", "vtl0_interrupt_without_vina",
    ],
    "vsm_misc": [
        "xl_success_4k", "xl_page_not_present", "xl_pml4e_not_present", "xl_non_canonical",
        "xl_user_on_supervisor_page", "xl_user_on_supervisor_exempt", "xl_user_read_ro", "xl_user_write_ro",
        "xl_supervisor_write_ro_wp0", "xl_nx_execute", "xl_nx_read", "xl_user_and_supervisor_rejected",
        "xl_large_page", "xl_large_page_second_2m", "xl_gpa_unmapped", "xl_set_bits_accessed_dirty",
        "xl_overlay_hypercall_page", "xl_overlay_hypercall_write_code", "xl_plain_page_not_overlay",
        "xl_vtl1_overlay_assist_page", "xl_vtl0_self_page", "xl_vtl0_target_vtl1_denied",
        "xl_vtl0_target_vtl1_no_output", "xl_vtl0_any_vp", "xl_gpa_no_read", "xl_gpa_no_read_large_page",
        "xl_gpa_no_write", "xl_gpa_ro_read_ok", "xl_gpa_no_execute", "xl_vtl0_self_gpa_no_read",
        "xl_vtl0_walk_through_secret", "xl_vtl0_walk_through_secret_no_gpa", "xl_vtl0_set_bits_through_secret",
        "xl_vtl1_for_vtl0_walk_through_secret", "xl_vtl0_set_bits_ro_page_table",
        "xl_vtl0_set_bits_ro_page_table_unchanged", "xl_vtl1_self_unrestricted",
        "cd_control_get_regs", "cd_control_post_delivered", "cd_control_post_payload", "cd_get_regs_output_ro",
        "cd_get_regs_output_ro_unchanged", "cd_get_regs_output_secret", "cd_get_regs_output_secret_unchanged",
        "cd_translate_output_ro", "cd_translate_output_ro_unchanged",
        "cd_apic_control", "cd_apic_control_output", "cd_apic_output_ro", "cd_apic_output_ro_unchanged",
        "cd_apic_output_secret", "cd_apic_output_secret_unchanged", "cd_apic_input_secret",
        "cd_apic_input_secret_no_output", "cd_get_regs_input_secret",
        "cd_get_regs_input_secret_no_output", "cd_post_input_secret", "cd_post_input_secret_nothing_posted",
        "cd_get_regs_input_ro_allowed", "cd_secret_unchanged",
        "tlb_vtl0_secure_config_denied", "tlb_lock_read_back_in_vtl1", "tlb_lock_released_value",
        "tlb_vtl0_flush_after_release", "tlb_inhibit_sets_lock", "tlb_inhibit_released_by_return",
        "tlb_vtl0_flush_after_inhibit", "tlb_secure_config_reserved_rejected",
    ],
    "vsm_smp": [
        "vtl1_enable_vp1", "vtl1_enable_vp1_again", "vp1_status_from_vp0_vtl1", "start_vp1", "vp1_up",
        "vp1_first_vtl_call", "vp1_vtl1_ready", "start_vp1_again",
        "calls_vp1_done", "calls_vp0_results", "calls_vp1_results", "calls_vp0_count", "calls_vp1_count",
        "calls_vp0_entries", "calls_vp1_entries", "calls_vtl1_private_stack", "calls_vtl1_vp_index",
        "calls_vtl1_private_assist_page", "calls_shared_regs_per_vp",
        "protect_intercept_page", "intercepts_vp1_done", "intercepts_vp0_count", "intercepts_vp1_count",
        "intercepts_vp0_msg_vp_index", "intercepts_vp1_msg_vp_index", "intercepts_vp0_msg_gpa",
        "intercepts_vp1_msg_gpa", "intercepts_vp0_no_effect", "intercepts_vp1_no_effect",
        "apic_ipi_vtl1_cross_vp_delivered", "apic_ipi_vtl1_cross_vp_entry_reason", "apic_ipi_vtl0_cross_vp_delivered",
        "apic_ipi_vtl1_vp1_to_vp0_delivered", "apic_ipi_vtl0_vector_a2_delivered", "apic_ipi_vtl1_stays_in_vtl1",
        "apic_ipi_vtl1_stays_in_vtl1_vp0", "apic_ipi_vtl0_stays_in_vtl0", "apic_ipi_vtl1_exactly_once",
        "pv_ipi_vtl1_to_vp1_vtl0_delivered", "pv_ipi_vtl1_to_vp1_vtl1_delivered", "pv_ipi_vtl0_to_vp1_vtl1_delivered",
        "pv_ipi_vtl0_to_vp1_delivered", "pv_ipi_vtl1_to_all_vtl0_vp0", "pv_ipi_vtl1_to_all_vtl0_vp1",
        "pv_ipi_vtl1_exactly_twice", "pv_ipi_vtl1_to_vtl0_not_in_vtl1", "pv_ipi_exactly_once",
        "tlb_vp1_vtl1_holds_lock", "tlb_vp1_lock_read_back", "tlb_vp0_vtl1_sees_vp1_lock",
        "tlb_flush_other_vp_status", "tlb_flush_other_vp_not_blocked", "tlb_flush_locked_vp_status",
        "tlb_flush_not_done_while_locked", "tlb_flush_order_issue_release_done", "tlb_flush_done_after_release_time",
        "tlb_flush_waited", "tlb_vp1_lock_released", "tlb_flush_vp1_after_release",
        "protect_cross_vp_status", "protect_cross_vp_writer_was_running", "protect_cross_vp_no_write_after_return",
        "protect_cross_vp_intercepted", "protect_cross_vp_msg_gpa", "protect_cross_vp_msg_vp",
        "protect_cross_vp_denied_value", "protect_cross_vp_restore",
    ],
}  # fmt: skip
SMP: dict[str, int] = {"vsm_smp": 2}  # guest name -> --smp


def _run(name: str) -> tuple[int, str, str]:
    kernel = build_guest(name)
    args = ["run", str(kernel), "--timeout", str(GUEST_TIMEOUT), "--smp", str(SMP.get(name, 1))]
    result = run_vsmtrace(args, timeout=GUEST_TIMEOUT + 30)
    return result.status, result.stdout, result.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vsm_guest(name: str) -> None:
    status, out, err = _run(name)
    tail = f"\n--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-2000:]}"
    failed = FAIL.findall(out)
    assert not failed, f"{name}: guest checks failed: {failed}{tail}"
    passed = set(OK.findall(out))
    missing = [c for c in EXPECTED[name] if c not in passed]
    assert not missing, f"{name}: checks never reported ok: {missing}{tail}"
    assert status == 1, f"{name}: exit status {status} (want 1 = guest exit code 0){tail}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vsm_guest_avoids_unemulated_instructions(name: str) -> None:
    """Same rule as test_guest_build: nothing KVM's instruction emulator lacks."""
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump")
    forbidden = ("cmpxchg16b", "xrstor", "xsave", "int3", "clac", "stac", "popcnt", "fwait", "endbr64")
    path = build_guest(name)
    env = {**os.environ, "LC_ALL": "C"}
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True, env=env)
    assert asm.returncode == 0, asm.stderr
    bad = [ln for ln in asm.stdout.splitlines() if any(f"\t{m}" in ln or f" {m} " in ln for m in forbidden)]
    assert not bad, "instructions KVM's emulator lacks:\n" + "\n".join(bad[:20])


@pytest.mark.kvm
def test_tlb_lock_deadlock_is_reported() -> None:
    """A guest whose every VP is suspended on a TLB lock no VP can release is stopped at once.

    VTL1 locks the TLB of VP1 (never started) and VTL0 flushes every processor: the TLFS
    suspends the caller, so the run can never end by itself. vsmtrace stops it as a guest
    deadlock (status 4) naming the lock, instead of hanging until --timeout (status 124).
    """
    kernel = build_guest("vsm_deadlock")
    result = run_vsmtrace(["run", str(kernel), "--timeout", str(GUEST_TIMEOUT), "--smp", "2"], timeout=GUEST_TIMEOUT + 30)
    tail = f"\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-2000:]}"
    assert not FAIL.findall(result.stdout), tail
    assert {"enable_vp1_vtl1", "inhibit_on_vp1"} <= set(OK.findall(result.stdout)), tail
    assert "flushing every processor" in result.stdout, tail
    assert result.status == 4, f"exit status {result.status} (want 4: guest deadlock){tail}"
    assert "guest deadlock: no VP can run to release a TLB lock" in result.stderr, tail
    assert "VP 0 waits in a flush for VTL 1's lock on VP 1's VTL 0 TLB" in result.stderr, tail
    assert "Traceback" not in result.stderr, tail
