"""The hardware-KVM rig's parts that need no QEMU run: module dependencies, the L1 image, the
command and QEMU lines, and how the runner reports a rig that fails (a stand-in QEMU script).
The rig itself runs for real in ``make test-hw``."""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import struct
from pathlib import Path

import pytest

from xenkvm.rig import image, kmod, qmp, runner
from xenkvm.rig.__main__ import pytest_argv

ROOT = Path(__file__).resolve().parents[2]


def module_elf(**info: str) -> bytes:
    """A minimal ELF64 relocatable with a .modinfo section of ``key=value`` strings."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    shstr = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    mi_off, st_off = body_off, body_off + len(modinfo)
    shoff = (st_off + len(shstr) + 7) & ~7
    hdr = bytearray(64)
    hdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HHH", hdr, 0x3A, 64, 3, 2)
    body = modinfo + shstr
    pad = b"\0" * (shoff - body_off - len(body))
    sections = bytes(64) + struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, mi_off, len(modinfo), 0, 0, 1, 0) \
        + struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, st_off, len(shstr), 0, 0, 1, 0)
    return bytes(hdr) + body + pad + sections


def tree(tmp_path: Path, mods: dict[str, str], builtin: tuple[str, ...] = ()) -> kmod.ModuleTree:
    for name, deps in mods.items():
        p = tmp_path / "kernel" / "sub" / f"{name}.ko"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(module_elf(name=name.replace("-", "_"), depends=deps, license="GPL"))
    (tmp_path / "modules.builtin").write_text("".join(f"kernel/x/{b}.ko\n" for b in builtin))
    return kmod.ModuleTree(tmp_path)


def test_modinfo_and_depends():
    elf = module_elf(name="kvm_amd", depends="kvm,ccp", license="GPL")
    assert kmod.modinfo(elf)["license"] == "GPL"
    assert kmod.depends(elf) == ["kvm", "ccp"]
    assert kmod.depends(module_elf(name="virtio", depends="")) == []


def test_modinfo_rejects_garbage():
    with pytest.raises(kmod.ModuleError):
        kmod.modinfo(b"not an elf" * 10)
    elf = bytearray(module_elf(name="x"))
    struct.pack_into("<Q", elf, 0x28, len(elf) + 4096)  # section table past the end
    with pytest.raises(kmod.ModuleError, match="out of bounds"):
        kmod.modinfo(bytes(elf))


def test_load_order_puts_dependencies_first_once(tmp_path):
    t = tree(tmp_path, {"kvm-amd": "kvm,ccp", "kvm": "irqbypass", "ccp": "", "irqbypass": "",
                        "9p": "9pnet,netfs", "9pnet": "", "netfs": ""})
    names = [m.name for m in t.load_order(["kvm_amd", "9p", "kvm"])]
    assert names == ["irqbypass", "kvm", "ccp", "kvm_amd", "9pnet", "netfs", "9p"]


def test_load_order_skips_builtins_and_refuses_missing_and_cycles(tmp_path):
    t = tree(tmp_path, {"a": "b,virtio", "b": "", "c": "d", "d": "c"}, builtin=("virtio",))
    assert [m.name for m in t.load_order(["a"])] == ["b", "a"]
    with pytest.raises(kmod.ModuleError, match="not found"):
        t.load_order(["nosuch"])
    with pytest.raises(kmod.ModuleError, match="cycle"):
        t.load_order(["c"])


def test_generic_kernel_package_matches_the_cloud_abi():
    assert image.generic_kernel_package("linux-image-6.1.0-57-cloud-amd64") == "linux-image-6.1.0-57-amd64"
    assert image.generic_kernel_package("linux-image-6.1.0-9-cloud-amd64-unsigned") == "linux-image-6.1.0-9-amd64"
    with pytest.raises(image.RigImageError):
        image.generic_kernel_package("linux-image-6.1.0-57-rt-amd64")


def test_l1_initramfs_loads_modules_in_order(tmp_path):
    mods = {"virtio-pci": "virtio", "virtio": "", "9pnet_virtio": "9pnet,virtio", "9pnet": "",
            "9p": "9pnet", "overlay": "", "kvm-amd": "kvm", "kvm": "", "tun": "", "bridge": "stp,llc",
            "stp": "llc", "llc": "", "vhost_net": "vhost", "vhost": ""}
    cpio, order = image.build_initramfs(b"\x7fELF busybox", tree(tmp_path, mods))
    assert order == ("virtio", "virtio_pci", "9pnet", "9pnet_virtio", "9p", "overlay", "kvm", "kvm_amd",
                     "tun", "llc", "stp", "bridge", "vhost", "vhost_net")
    raw = cpio.to_bytes()
    listed = raw.split(b"lib/modules/load-order\0", 1)[1]
    assert listed.lstrip(b"\0").startswith("".join(f"{m}.ko\n" for m in order).encode())
    assert b"init\0" in raw and image.READY.encode() in raw and b"insmod" in raw
    assert gzip.decompress(cpio.to_bytes(compress="gzip")) == raw


def test_command_script_and_qemu_line(tmp_path):
    script = runner.command_script(["python", "-m", "pytest", "-k", "a and b"], Path("/repo dir"),
                                   {"XENKVM_RIG": "x", "PATH": "/bin"})
    assert "cd '/repo dir'" in script and "'a and b'" in script
    assert f"echo $? > {image.CHROOT_OUT}/status" in script and "XENKVM_RIG=x" in script
    l1 = image.L1Image(Path("/k"), Path("/i"), "6.1", ())
    cmd = runner.qemu_command("qemu", l1, tmp_path, memory_mb=1024, cpus=2)
    assert cmd[cmd.index("-accel") + 1] == "tcg" and cmd[cmd.index("-cpu") + 1] == "max"
    shares = [cmd[i + 1] for i, c in enumerate(cmd) if c == "-virtfs"]
    assert any("path=/," in s and "readonly=on" in s for s in shares)
    assert any(f"path={tmp_path}," in s and "readonly" not in s for s in shares)


def test_pytest_argv_defaults_to_the_hw_selection():
    assert pytest_argv([])[-5:] == ["-m", "hw", "tests/kvm", "tests/xen", "tests/linux"]
    assert pytest_argv(["-m", "kvm", "tests/kvm"])[-3:] == ["-m", "kvm", "tests/kvm"]
    assert pytest_argv(["-k", "trap"])[-6:] == ["hw", "-k", "trap", "tests/kvm", "tests/xen", "tests/linux"]


def fake_qemu(tmp_path: Path, body: str) -> None:
    """A stand-in ``qemu-system-x86_64`` on PATH that prints ``body`` as L1's console would."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    q = bindir / "qemu-system-x86_64"
    q.write_text(f"#!/bin/sh\n{body}\n")
    q.chmod(0o755)
    os.environ["PATH"] = f"{bindir}:{os.environ['PATH']}"


@pytest.fixture
def l1(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"])
    return image.L1Image(tmp_path / "k", tmp_path / "i", "6.1", ())


def test_no_qemu_is_one_line(l1, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(runner.RigError, match="qemu-system-x86_64 not found"):
        runner.run(l1, ["true"], cwd=ROOT, out_dir=tmp_path / "out")


def test_l1_error_line_is_reported(l1, tmp_path):
    fake_qemu(tmp_path, f'echo "{image.ERROR} the emulated CPU has no svm flag"; echo "[ 1.0] dmesg"')
    with pytest.raises(runner.RigError, match="L1 failed: the emulated CPU has no svm flag"):
        runner.run(l1, ["true"], cwd=ROOT, out_dir=tmp_path / "out", boot_timeout=30, timeout=60)


def test_boot_timeout_kills_qemu(l1, tmp_path):
    fake_qemu(tmp_path, "echo booting; exec sleep 60")
    with pytest.raises(runner.RigError, match="not ready after 1s"):
        runner.run(l1, ["true"], cwd=ROOT, out_dir=tmp_path / "out", boot_timeout=1, timeout=60)


def test_status_and_output_come_back(l1, tmp_path):
    out = tmp_path / "out"
    # What L1's init does with the results share: run command.sh, then power off.
    fake_qemu(tmp_path, f'echo "{image.READY} 2.5 6.1"; printf "7\\n" > {out}/status; '
                        f'echo "from inside" > {out}/output.log; echo "{image.DONE} 3.0"')
    res = runner.run(l1, ["pytest"], cwd=ROOT, out_dir=out, boot_timeout=30, timeout=60)
    assert (res.status, res.output, res.l1_uptime_s) == (7, "from inside\n", 2.5)
    assert image.DONE in res.console and (out / "console.log").read_text() == res.console + "\n"


def test_qemu_exit_without_status_is_an_error(l1, tmp_path):
    fake_qemu(tmp_path, f'echo "{image.READY} 2.5 6.1"; exit 1')
    with pytest.raises(runner.RigError, match="no exit status"):
        runner.run(l1, ["true"], cwd=ROOT, out_dir=tmp_path / "out", boot_timeout=30, timeout=60)


@pytest.mark.skipif(not (ROOT / ".cache" / "rig" / "kernel" / "lib" / "modules").is_dir(),
                    reason="the rig's kernel is not downloaded (make test-hw)")
def test_real_generic_kernel_resolves_kvm_amd():
    moddir = sorted((ROOT / ".cache" / "rig" / "kernel" / "lib" / "modules").iterdir())[-1]
    names = [m.name for m in kmod.ModuleTree(moddir).load_order(list(image.WANTED_MODULES))]
    assert names.index("kvm") < names.index("kvm_amd") and names.index("ccp") < names.index("kvm_amd")
    assert names.index("9pnet") < names.index("9p") and "overlay" in names and "tun" in names
    assert names.index("stp") < names.index("bridge") and names.index("vhost") < names.index("vhost_net")


def test_a_checkout_under_l1s_own_tmp_is_refused_with_one_line(tmp_path):
    """L1 mounts a fresh tmpfs on /tmp: a repository there would fail inside with "can't cd"."""
    from xenkvm.rig.runner import RigError, check_cwd
    with pytest.raises(RigError, match="under /tmp, which L1 mounts afresh"):
        check_cwd(Path("/tmp/checkout"))
    check_cwd(Path("/work/checkout"))        # elsewhere: fine (need not exist)


def test_qemu_dies_with_a_killed_runner(tmp_path):
    """A runner killed by a signal takes its QEMU with it (it would otherwise burn a core)."""
    pidfile = tmp_path / "child.pid"
    script = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
              "from xenkvm.rig import runner\n"
              "p = runner.spawn(['sleep', '600'])\n"
              f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(200):
            if pidfile.is_file() and pidfile.read_text():
                break
            time.sleep(0.05)
        child = int(pidfile.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        for _ in range(200):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{child}/stat") as f:     # reaped by init shortly after it dies
                if f.read().split(") ")[1].startswith("Z"):
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the child outlived its killed runner")
    finally:
        parent.kill()


def test_a_qemu_that_uses_no_cpu_is_found_stalled():
    """The rig gives up on an L1 whose QEMU sleeps for runner.STALL_S (runner.py: L1_CMDLINE)."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        watch = runner._StallWatch(sleeper.pid, 0.0)
        assert not watch.stalled(1.0)
        assert watch.stalled(runner.STALL_S + 1.0)
    finally:
        sleeper.kill()
        sleeper.wait()
    busy = runner._StallWatch(os.getpid(), 0.0)
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass                                        # this process uses CPU meanwhile
    assert not busy.stalled(runner.STALL_S + 1.0)
    assert runner.cpu_seconds(2**22 + 7) is None    # no such process


def test_l1_polls_when_idle():
    assert "idle=poll" in runner.L1_CMDLINE.split()


# -- a silent L1: QMP, where its CPU is, the NMI (runner._Silence) ------------------------------

def test_registers_rip_and_symbols():
    regs = "RAX=0000000000000000 RBX=ffffffff81e0a940\nRIP=ffffffff81c3b2a6 RFL=00000246 [---Z-P-] CPL=0 II=0"
    assert qmp.registers_rip(regs) == (0xffffffff81c3b2a6, 0)
    assert qmp.registers_rip("no registers here") is None
    syms = qmp.SymbolMap("ffffffff81000000 T _stext\nffffffff81c3b280 T default_idle\n"
                         "ffffffff81c3b300 t other\nffffffff82000000 D some_data\n")
    assert syms.name(0xffffffff81c3b2a6) == "default_idle+0x26"
    assert syms.name(0x401000) is None                       # user space (L1's or L2's)
    assert runner.where(regs, syms) == "RIP 0xffffffff81c3b2a6 (default_idle+0x26 if L1's) CPL 0"
    assert "not L1 kernel text" in runner.where("RIP=0000000000401000 CPL=3", syms)
    assert qmp.SymbolMap.load(Path("/nonexistent/System.map")).name(0xffffffff81000000) is None


def test_last_line_names_the_running_test(tmp_path):
    out = tmp_path / "output.log"
    out.write_text("tests/xen/a.py::one PASSED\n" * 500 + "tests/xen/b.py::two \n\n")
    assert runner.last_line(out) == "tests/xen/b.py::two"
    assert runner.last_line(tmp_path / "missing") == ""


def test_silence_pokes_each_stretch_and_is_summed_up_at_the_limit(tmp_path, caplog):
    out = tmp_path / "output.log"
    out.write_text("tests/kvm/x.py::stuck ")
    watch = runner._Silence(out, runner._Poker(tmp_path / "no-qmp", tmp_path / "no-map"), 0.0, after=100)
    watch.check(99)
    assert watch.nmis == 0 and watch.summary() == ""
    watch.check(101)
    assert watch.nmis == 1 and "no QMP socket" in watch.reports[0] and "NMI 1 injected" in caplog.text
    watch.check(150)
    assert watch.nmis == 1                                  # one NMI a stretch of silence
    for t in (201, 301, 401, 501):
        watch.check(t)
    assert watch.nmis == runner.MAX_POKES == len(watch.reports)
    assert watch.summary().startswith(f"the command silent for 501s, {runner.MAX_POKES} NMI(s) did not wake it")
    assert watch.summary().endswith("last output line: tests/kvm/x.py::stuck")


def test_silence_ends_when_the_command_speaks_again(tmp_path, caplog):
    out = tmp_path / "output.log"
    out.write_text("tests/kvm/x.py::slow ")
    watch = runner._Silence(out, runner._Poker(tmp_path / "no-qmp", tmp_path / "no-map"), 0.0, after=100)
    watch.check(101)
    out.write_text("tests/kvm/x.py::slow PASSED\n")
    watch.check(130)
    assert "spoke again 29s after the last NMI" in caplog.text
    assert watch.nmis == 0 and watch.summary() == ""
    watch.check(229)
    assert watch.nmis == 0                                  # counted from when it spoke
    watch.check(231)
    assert watch.nmis == 1


@pytest.fixture
def qemu_monitor(tmp_path):
    """A real QEMU with no machine at all, only its QMP socket."""
    yield from _qemu_with_qmp(tmp_path / "qmp", ["-machine", "none"])


def _qemu_with_qmp(sock: Path, machine: list[str]):
    """Run a real QEMU (``machine`` options) with its QMP socket at ``sock``; yield the socket."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("no qemu-system-x86_64 (make deps installs it)")
    proc = subprocess.Popen(["qemu-system-x86_64", *machine, "-nodefaults", "-display", "none",
                             "-qmp", f"unix:{sock},server=on,wait=off"], stdin=subprocess.DEVNULL)
    try:
        for _ in range(400):
            if sock.exists():
                break
            time.sleep(0.05)
        yield sock
    finally:
        proc.kill()
        proc.wait()


def test_qmp_against_a_real_qemu(qemu_monitor):
    with qmp.Qmp(qemu_monitor) as mon:
        version = mon.execute("query-version")
        assert version["qemu"]["major"] >= 7
        assert "QEMU" in mon.hmp("info version") or mon.hmp("info version").strip()[0].isdigit()
        with pytest.raises(qmp.QmpError, match="QEMU refused no-such-command"):
            mon.execute("no-such-command")
        assert mon.execute("query-status")["status"]          # still usable after an error


@pytest.fixture
def qemu_stopped_pc(tmp_path):
    """A real QEMU with one TCG CPU that never starts (``-S``), only its QMP socket."""
    yield from _qemu_with_qmp(tmp_path / "qmp-pc", ["-machine", "pc", "-accel", "tcg", "-S", "-m", "16"])


def test_a_poke_logs_registers_and_the_local_apic(qemu_stopped_pc, tmp_path, caplog):
    """The poke of a real CPU that never ran (reset, real mode: EIP, no RIP): the report says so,
    the registers and the local APIC's state (timer LVT and counts, ISR/IRR) are logged, and the
    NMI is accepted (a refused one would be a QmpError, the report its text)."""
    with caplog.at_level(logging.WARNING, logger="xenkvm.rig"):
        report = runner._Poker(qemu_stopped_pc, tmp_path / "no-map").poke()
    assert report == "no RIP in info registers"
    assert "QMP info registers" in caplog.text and "EIP=0000fff0" in caplog.text
    assert "QMP info lapic" in caplog.text and "LVTT" in caplog.text and "current_count" in caplog.text
    assert "ISR" in caplog.text and "IRR" in caplog.text


def test_the_qemu_line_has_a_qmp_socket(l1, tmp_path):
    cmd = runner.qemu_command("qemu", l1, tmp_path, memory_mb=512, cpus=1, qmp=tmp_path / "q")
    assert cmd[cmd.index("-qmp") + 1] == f"unix:{tmp_path / 'q'},server=on,wait=off"
    assert "nokaslr" in runner.L1_CMDLINE.split()      # kallsyms' addresses are the same each boot
    assert runner.kallsyms_cache(l1) == l1.kernel.parent / "kallsyms-6.1"


def test_print_tail_shows_the_end_of_the_output(tmp_path, capsys):
    from xenkvm.rig.__main__ import print_tail
    out = tmp_path / "output.log"
    out.write_text("".join(f"line {i}\n" for i in range(100)))
    print_tail(out, lines=3)
    assert capsys.readouterr().out == "rig: the last 3 lines of the command's output:\nline 97\nline 98\nline 99\n"


def test_a_run_out_of_time_says_what_its_silence_showed(l1, tmp_path):
    out = tmp_path / "out"
    fake_qemu(tmp_path, f'echo "{image.READY} 2.5 6.1"; echo "tests/a.py::hangs " > {out}/output.log; '
                        f'exec sleep 60')
    with pytest.raises(runner.RigError, match=r"exceeded its 4s limit; the command silent for \ds, "
                                              r"1 NMI\(s\) did not wake it, L1's CPU: no QMP socket.*"
                                              r"last output line: tests/a.py::hangs"):
        runner.run(l1, ["true"], cwd=ROOT, out_dir=out, boot_timeout=30, timeout=4, silent_after=2.5)


def test_a_lost_heartbeat_is_poked_then_l1_is_dead(tmp_path, caplog):
    beat = tmp_path / "heartbeat"
    watch = runner._Heartbeat(beat, runner._Poker(tmp_path / "no-qmp", tmp_path / "no-map"), 0.0)
    assert watch.check(10_000) == ""                 # no beat yet: the command has not started
    beat.write_text("12.5 10.0\n")
    assert watch.check(10_001) == ""
    lost = 10_001 + runner.HEARTBEAT_LOST_S
    assert watch.check(lost - 1) == "" and "NMI" not in caplog.text
    assert watch.check(lost + 1) == "" and "heartbeat lost" in caplog.text
    assert watch.check(lost + runner.HEARTBEAT_GRACE_S) == ""
    why = watch.check(lost + runner.HEARTBEAT_GRACE_S + 2)
    assert why.startswith(f"L1 died: no heartbeat for {runner.HEARTBEAT_LOST_S + runner.HEARTBEAT_GRACE_S + 2}s "
                          f"(L1 uptime 12.5 at the last)") and "no QMP socket" in why


def test_a_heartbeat_that_comes_back_after_the_nmi_is_alive(tmp_path, caplog):
    beat = tmp_path / "heartbeat"
    beat.write_text("12.5 10.0\n")
    watch = runner._Heartbeat(beat, runner._Poker(tmp_path / "no-qmp", tmp_path / "no-map"), 0.0)
    watch.check(1)
    watch.check(runner.HEARTBEAT_LOST_S + 2)
    beat.write_text("13.0 10.1\n")
    assert watch.check(runner.HEARTBEAT_LOST_S + 12) == "" and "came back 10s after the NMI" in caplog.text
    assert watch.check(runner.HEARTBEAT_LOST_S + runner.HEARTBEAT_GRACE_S + 20) == ""


def test_the_command_script_beats(tmp_path, monkeypatch):
    """command.sh writes L1's uptime to the heartbeat file as it starts and then every
    HEARTBEAT_EVERY_S while the command runs (atomically: a rename), and stops when it ends;
    run here with /proc/uptime standing in for L1's."""
    monkeypatch.setattr(runner, "HEARTBEAT_EVERY_S", 0.1)
    beats = tmp_path / "beats"
    watch = f"for i in 1 2 3 4 5 6 7 8 9 10; do cat {tmp_path}/{runner.HEARTBEAT} >> {beats}; sleep 0.3; done"
    script = runner.command_script(["sh", "-c", watch], tmp_path, {"A": "1"})
    script = script.replace(image.CHROOT_OUT, str(tmp_path))
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and (tmp_path / "status").read_text() == "0\n"
    seen = [float(line.split()[0]) for line in beats.read_text().splitlines()]
    assert len(seen) == 10 and seen[0] > 0 and len(set(seen)) >= 5, seen    # beating while it ran
    last = (tmp_path / runner.HEARTBEAT).read_text()
    time.sleep(1)
    assert (tmp_path / runner.HEARTBEAT).read_text() == last      # killed with the command's end


def test_a_dead_l1_is_retried_once_then_reported(l1, tmp_path, monkeypatch, capsys):
    """--retry-dead: a fresh L1 after one that died; the second death is the run's result."""
    from xenkvm.rig import __main__ as rig_main
    out = tmp_path / "out"
    runs = tmp_path / "runs"
    monkeypatch.setattr(runner, "HEARTBEAT_LOST_S", 1.0)
    monkeypatch.setattr(runner, "HEARTBEAT_GRACE_S", 1.0)
    fake_qemu(tmp_path, f'echo run >> {runs}; echo "{image.READY} 2.5 6.1"; echo "1.0 1.0" > {out}/heartbeat; '
                        f'echo "tests/a.py::t " > {out}/output.log; exec sleep 60')
    args = rig_main.argparse.Namespace(retry_dead=1, memory=512, cpus=1, boot_timeout=30, timeout=60,
                                       quiet=True, silent_after=900)
    monkeypatch.setattr(rig_main, "REPO_ROOT", ROOT)
    with pytest.raises(runner.L1Died, match="L1 died: no heartbeat.*last output line: tests/a.py::t"):
        rig_main.run_retrying(l1, ["true"], out, args)
    assert runs.read_text() == "run\nrun\n"
    captured = capsys.readouterr()
    assert "running it again in a fresh L1 (1 of 1); the dead one's console is" in captured.err
    assert (out / "console-dead-1.log").is_file() and (out / "console-dead-2.log").is_file()
    assert "lines of the dead L1's console:" in captured.out


def test_l1_writes_its_symbols_once_per_cache(l1, tmp_path):
    """The first run asks for /proc/kallsyms (want-kallsyms), keeps what L1 wrote in the cache;
    later runs do not ask again."""
    out = tmp_path / "out"
    l1.kernel.parent.mkdir(parents=True, exist_ok=True)
    fake_qemu(tmp_path, f'echo "{image.READY} 2.5 6.1"; [ -e {out}/want-kallsyms ] && '
                        f'echo "ffffffff81000000 T _stext" > {out}/kallsyms; printf "0\\n" > {out}/status')
    runner.run(l1, ["true"], cwd=ROOT, out_dir=out, boot_timeout=30, timeout=60)
    assert runner.kallsyms_cache(l1).read_text() == "ffffffff81000000 T _stext\n"
    runner.run(l1, ["true"], cwd=ROOT, out_dir=out, boot_timeout=30, timeout=60)
    assert not (out / "want-kallsyms").exists() and not (out / "kallsyms").exists()
    script = runner.command_script(["true"], ROOT, {})
    assert "/proc/kallsyms" in script and "want-kallsyms" in script


def test_the_logged_registers_stop_before_the_fpu():
    text = "RAX=0 RBX=0\nRIP=ffffffff81000000 CPL=0\nCR0=80050033 CR3=1000\nFCW=037f FSW=0000\nYMM00=0 0 0 0\n"
    assert runner.general_registers(text) == "RAX=0 RBX=0\nRIP=ffffffff81000000 CPL=0\nCR0=80050033 CR3=1000"
