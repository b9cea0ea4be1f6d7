# xenkvm: the two commands are `make run` (build everything, boot the default
# guest, show its console) and `make test` (the whole test suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE := .cache
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages: Xen public headers (cffi builds), Xen's own xenstore clients
# (integration tests), busybox and cpio (Linux initramfs), gcc/make for guests, QEMU (the
# hardware-KVM rig, docs/hw-rig.md, and the boot benchmark's baseline).
DEB_PKGS := gcc make libxen-dev xenstore-utils busybox-static cpio acpica-tools python3-venv qemu-system-x86
# e2fsprogs: mke2fs -d builds the Debian guest's root file system image, debugfs/e2fsck check it.
DEB_PKGS += e2fsprogs
# qemu-system-common: qemu-storage-daemon serves non-raw disk images over NBD (backends/imagedisk.py);
# qemu-utils: qemu-img makes and checks them in the tests and the benchmark.
DEB_PKGS += qemu-system-common qemu-utils
# make run's guest: Debian as a managed Xen PVH domain (an xl.cfg file: python -m xenkvm.quickstart,
# docs/make-run.md); a YAML definition runs in the foreground (make run GUEST=guests/hello.yaml).
GUEST ?= guests/debian-pvh.cfg
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: all build deps venv guests run test test-quick test-hw rig-image check test-linux linux-image linux-xen-image rootfs-image bench info clean distclean

all: build

build: deps venv guests

deps: $(CACHE)/deps.stamp
$(CACHE)/deps.stamp: Makefile
	@mkdir -p $(CACHE)
	@missing=$$(for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

venv: $(VENV)/stamp
$(VENV)/stamp: pyproject.toml setup.py xenkvm/_cffi_modules.py xenkvm/kvm/_build.py xenkvm/machine/boot/_abi_build.py xenkvm/xen/_abi_build.py xenkvm/backends/_blkif_build.py xenkvm/backends/_netif_build.py xenkvm/backends/_nbd_build.py xenkvm/backends/xk_grants.h xenkvm/backends/xk_policy.h xenkvm/xen/_fast_build.py $(CACHE)/deps.stamp
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

guests: deps
	$(MAKE) -C guests

ifeq ($(suffix $(GUEST)),.cfg)
run: build rootfs-image
	$(PY) -m xenkvm.quickstart $(GUEST)
else
run: build
	$(VENV)/bin/xenkvm run $(GUEST)
endif

info: build
	$(VENV)/bin/xenkvm info

# The whole suite, in three parts sharing CI's two cores, two at a time:
#  - on this host: every test but the Debian boots, plus the plain Debian boot (marker linux_host;
#    a Debian boot takes 3-15 min on a PVM host, so the Xen PVH/HVM boots are left to the rig here
#    and to make test-linux);
#  - in the nested hardware-KVM rig (test-hw, docs/hw-rig.md), two L1 machines: the guest tests
#    (tests/kvm, tests/xen) from the start, beside the host's tests, and the Debian boots
#    (tests/linux: plain, Xen PVH and HVM, balloon, disk, net, make run, the managed toolstack with
#    one and two Debian guests, Debian snapshots and save/restore) once the host's are done.
# Each keeps one core busy (the PVM vCPU, QEMU's TCG thread).  The rig parts are verbose (-v): if
# one runs past its limit or falls silent, the output tail it prints names the test that was running.
# An L1 that dies under its tests (QEMU TCG's stall: docs/hw-rig.md) is replaced once by a fresh one.
# The rig's output is kept in build/test-hw*.log and printed after the host's; the host's own in
# build/test-host.log.  CI shows only the end of make's output, so the last lines are a summary of
# the three parts: failures, rig errors and pytest's closing line for each.
test: build linux-image linux-xen-image rootfs-image rig-image
	@mkdir -p build; rm -f build/test-hw*.log build/test-hw.rc build/test-host.log
	@echo "make test: the rig's guest tests run in the background (build/test-hw.log), printed at the end"
	@( $(PY) -m xenkvm.rig -q --timeout 2400 --retry-dead 1 test -v --durations=15 tests/kvm tests/xen > build/test-hw.log 2>&1; echo $$? > build/test-hw.rc ) & \
	$(PYTEST) --durations=25 -m "(not linux or linux_host) and not known_race" tests 2>&1 | tee build/test-host.log; \
	host=$${PIPESTATUS[0]}; \
	echo "make test: the rig's Debian boots (build/test-hw-linux.log)"; \
	$(PY) -m xenkvm.rig -q --timeout 2400 --retry-dead 1 test -v --durations=0 tests/linux > build/test-hw-linux.log 2>&1; hwl=$$?; \
	wait; \
	echo "===== the hardware-KVM rig: guest tests (tests/kvm, tests/xen) ====="; cat build/test-hw.log; \
	echo "===== the hardware-KVM rig: Debian boots (tests/linux) ====="; cat build/test-hw-linux.log; \
	hw=$$(cat build/test-hw.rc 2>/dev/null || echo 125); \
	echo "===== make test: summary ====="; \
	for f in build/test-host.log build/test-hw.log build/test-hw-linux.log; do \
	  echo "$$f:"; grep -E '^(FAILED|ERROR) |^rig: [^$$]|^=+ .*(passed|failed|error|no tests ran).* =+$$' $$f | grep -v '^rig: L1: ' | cut -c1-300 | tail -n 6; \
	done; \
	echo "make test: host suite exit $$host, rig guest tests exit $$hw, rig Debian boots exit $$hwl"; \
	[ $$host = 0 ] && [ $$hw = 0 ] && [ $$hwl = 0 ]

# The rig's L1 kernel and initramfs (apt-get download: done before make test starts the rig
# beside the PVM suite, so no two apt-get runs overlap).
rig-image: build
	$(PY) -m xenkvm.rig image

# The `hw` selection (guest tests, the plain, Xen PVH and HVM Debian boots, the balloon test) under hardware KVM: inside
# a QEMU TCG machine with AMD SVM whose kvm_amd gives /dev/kvm (docs/hw-rig.md).
test-hw: build linux-image linux-xen-image rootfs-image
	$(PY) -m xenkvm.rig test

# Everything but the Debian kernel boots (about a minute).
test-quick: build
	$(PYTEST) -m "not linux" tests

# The fast inner loop: unit tests only, stop at the first failure.
check: venv
	$(PYTEST) -x -q -m "not kvm" tests/unit tests/xenstore tests/backends

linux-image: build
	$(PY) -m xenkvm.images linux --cache $(CACHE)/linux

# The same kernel as a Xen guest: an initramfs with Debian's xenstore-utils, and
# guests/linux-pvh.yaml + guests/linux-hvm.yaml (docs/linux-xen.md).
linux-xen-image: build
	$(PY) -m xenkvm.images linux-xen --cache $(CACHE)/linux

# Debian's root file system on xvda: an ext4 image (mke2fs -d) from Debian's busybox-static and
# the initramfs that loads xen-blkfront and switch_roots into it (xenkvm/rootfs.py).
rootfs-image: build
	$(PY) -m xenkvm.images rootfs --cache $(CACHE)/linux

test-linux: linux-image linux-xen-image rootfs-image
	$(PYTEST) -m linux -s tests

bench: build
	$(PY) benchmarks/run.py

clean:
	$(MAKE) -C guests clean
	rm -rf build

distclean: clean
	rm -rf $(VENV) $(CACHE) xenkvm/**/*.so
