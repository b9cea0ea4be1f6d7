"""ABI constants and the ring layout checked against the real C header.

A tiny cffi API-mode module is compiled from /usr/include/xen/io/xs_wire.h, so
offsetof/enum values/the error table come from the C compiler, not from us.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import pytest

from xenkvm.xenstore import protocol, ring
from xenkvm.xenstore.protocol import XsError, XsType

HEADER = "/usr/include/xen/io/xs_wire.h"
TYPES = [t.name for t in XsType if t is not XsType.INVALID]

CDEF = """
typedef uint32_t XENSTORE_RING_IDX;
struct xenstore_domain_interface {
    char req[...];
    char rsp[...];
    XENSTORE_RING_IDX req_cons, req_prod;
    XENSTORE_RING_IDX rsp_cons, rsp_prod;
    uint32_t server_features;
    uint32_t connection;
    uint32_t error;
    ...;
};
struct xsd_sockmsg { uint32_t type; uint32_t req_id; uint32_t tx_id; uint32_t len; };
struct xsd_errors { int errnum; const char *errstring; };
static const struct xsd_errors xsd_errors[16];
enum xsd_sockmsg_type { %s, XS_TYPE_COUNT, XS_INVALID, ... };
#define XENSTORE_RING_SIZE ...
#define XENSTORE_PAYLOAD_MAX ...
#define XENSTORE_ABS_PATH_MAX ...
#define XENSTORE_REL_PATH_MAX ...
#define XENSTORE_SERVER_FEATURE_RECONNECTION ...
#define XENSTORE_SERVER_FEATURE_ERROR ...
#define XENSTORE_CONNECTED ...
#define XENSTORE_RECONNECT ...
#define XENSTORE_ERROR_NONE ...
#define XENSTORE_ERROR_COMM ...
#define XENSTORE_ERROR_RINGIDX ...
#define XENSTORE_ERROR_PROTO ...
""" % ", ".join(f"XS_{name}" for name in TYPES)


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    cffi = pytest.importorskip("cffi")
    if not os.path.exists(HEADER):
        pytest.skip(f"{HEADER} missing (install libxen-dev)")
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source("_xs_wire_abi", "#include <errno.h>\n#include <stdint.h>\n"
                   "#include <xen/io/xs_wire.h>\n")
    out = tmp_path_factory.mktemp("xs_abi")
    lib_path = ffi.compile(tmpdir=str(out), verbose=False)
    spec = importlib.util.spec_from_file_location("_xs_wire_abi", lib_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.pop("_xs_wire_abi", None)
    return module


def test_ring_offsets_match_header(c):
    ffi = c.ffi
    struct = "struct xenstore_domain_interface"
    assert ffi.offsetof(struct, "req") == ring.REQ_OFFSET
    assert ffi.offsetof(struct, "rsp") == ring.RSP_OFFSET
    assert ffi.offsetof(struct, "req_cons") == ring.REQ_CONS
    assert ffi.offsetof(struct, "req_prod") == ring.REQ_PROD
    assert ffi.offsetof(struct, "rsp_cons") == ring.RSP_CONS
    assert ffi.offsetof(struct, "rsp_prod") == ring.RSP_PROD
    assert ffi.offsetof(struct, "server_features") == ring.SERVER_FEATURES
    assert ffi.offsetof(struct, "connection") == ring.CONNECTION
    assert ffi.offsetof(struct, "error") == ring.ERROR
    assert ffi.sizeof(struct) <= protocol.RING_PAGE_SIZE
    assert ffi.sizeof("struct xsd_sockmsg") == protocol.HEADER_SIZE


def test_constants_match_header(c):
    lib = c.lib
    assert lib.XENSTORE_RING_SIZE == protocol.RING_SIZE
    assert lib.XENSTORE_PAYLOAD_MAX == protocol.PAYLOAD_MAX
    assert lib.XENSTORE_ABS_PATH_MAX == protocol.ABS_PATH_MAX
    assert lib.XENSTORE_REL_PATH_MAX == protocol.REL_PATH_MAX
    assert lib.XENSTORE_SERVER_FEATURE_RECONNECTION == protocol.SERVER_FEATURE_RECONNECTION
    assert lib.XENSTORE_SERVER_FEATURE_ERROR == protocol.SERVER_FEATURE_ERROR
    assert lib.XENSTORE_CONNECTED == protocol.XENSTORE_CONNECTED
    assert lib.XENSTORE_RECONNECT == protocol.XENSTORE_RECONNECT
    for err in protocol.RingError:
        assert getattr(lib, f"XENSTORE_ERROR_{err.name}") == err


def test_message_types_match_header(c):
    for name in TYPES:
        assert getattr(c.lib, f"XS_{name}") == XsType[name], name
    assert c.lib.XS_TYPE_COUNT == protocol.XS_TYPE_COUNT
    assert c.lib.XS_INVALID == XsType.INVALID


def test_error_table_matches_header(c):
    table = [(e.errnum, c.ffi.string(e.errstring).decode()) for e in c.lib.xsd_errors]
    assert table == [(int(e), e.name) for e in XsError]
