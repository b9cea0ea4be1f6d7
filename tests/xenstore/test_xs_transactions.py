"""Transactions: unit tests plus a hypothesis state machine against a reference model."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from xsdirect import Direct
from xenkvm.xenstore.dispatch import Xenstored
from xenkvm.xenstore.protocol import XsType


def test_ids_are_per_connection_and_start_at_1(dom0, make_client):
    other = make_client(0)
    assert dom0.start() == 1
    assert dom0.start() == 2
    assert other.start() == 1


def test_isolation_until_commit(dom0, make_client):
    other = make_client(0)
    dom0.write("/a", "old")
    tx = dom0.start()
    dom0.write("/a", "new", tx=tx)
    dom0.write("/b/c", "created", tx=tx)
    assert dom0.read("/a", tx=tx) == b"new"
    assert other.read("/a") == b"old"
    assert other.err(XsType.READ, b"/b/c\0") == "ENOENT"
    dom0.end(tx)
    assert other.read("/a") == b"new"
    assert other.read("/b/c") == b"created"


def test_abort_discards(dom0):
    dom0.write("/a", "old")
    tx = dom0.start()
    dom0.write("/a", "new", tx=tx)
    dom0.rm("/a", tx=tx)
    dom0.end(tx, commit=False)
    assert dom0.read("/a") == b"old"


def test_conflict_on_node_read(dom0, make_client):
    other = make_client(0)
    dom0.write("/a", "1")
    tx = dom0.start()
    dom0.read("/a", tx=tx)
    other.write("/a", "2")
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"
    # After END the transaction is gone whatever the result.
    assert dom0.err(XsType.READ, b"/a\0", tx) == "ENOENT"


def test_conflict_on_node_written(dom0, make_client):
    other = make_client(0)
    dom0.write("/a", "1")
    tx = dom0.start()
    dom0.write("/a", "mine", tx=tx)
    other.write("/a", "theirs")
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"
    assert dom0.read("/a") == b"theirs"


def test_no_conflict_on_unrelated_change(dom0, make_client):
    other = make_client(0)
    dom0.write("/a/x", "1")
    dom0.write("/b/y", "1")
    tx = dom0.start()
    dom0.read("/a/x", tx=tx)
    dom0.write("/a/x", "2", tx=tx)
    other.write("/b/y", "2")
    other.write("/c/new", "2")
    dom0.end(tx)
    assert dom0.read("/a/x") == b"2"


def test_parallel_disjoint_transactions_both_commit(dom0, make_client):
    other = make_client(0)
    dom0.write("/a/x", "0")
    dom0.write("/b/y", "0")
    t1, t2 = dom0.start(), other.start()
    dom0.write("/a/x", "1", tx=t1)
    other.write("/b/y", "1", tx=t2)
    dom0.end(t1)
    other.end(t2)
    assert (dom0.read("/a/x"), dom0.read("/b/y")) == (b"1", b"1")


def test_child_list_change_conflicts_with_directory(dom0, make_client):
    other = make_client(0)
    dom0.write("/d/a", "")
    tx = dom0.start()
    assert dom0.ls("/d", tx=tx) == ["a"]
    other.write("/d/b", "")
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"


def test_read_of_missing_node_conflicts_with_its_creation(dom0, make_client):
    other = make_client(0)
    dom0.write("/d", "")
    tx = dom0.start()
    assert dom0.err(XsType.READ, b"/d/n\0", tx) == "ENOENT"
    other.write("/d/n", "now")
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"


def test_nested_start_is_ebusy(dom0):
    tx = dom0.start()
    assert dom0.err(XsType.TRANSACTION_START, b"\0", tx) == "EBUSY"


def test_unknown_tx_id_is_enoent(dom0):
    for type_, payload in [(XsType.READ, b"/\0"), (XsType.WRITE, b"/a\0v"),
                           (XsType.TRANSACTION_START, b"\0"),
                           (XsType.TRANSACTION_END, b"T\0")]:
        assert dom0.err(type_, payload, tx=42) == "ENOENT"


def test_end_without_tx_is_enoent(dom0):
    assert dom0.err(XsType.TRANSACTION_END, b"T\0") == "ENOENT"


def test_end_bad_argument_keeps_tx(dom0):
    tx = dom0.start()
    assert dom0.err(XsType.TRANSACTION_END, b"X\0", tx) == "EINVAL"
    assert dom0.err(XsType.TRANSACTION_END, b"T", tx) == "EINVAL"
    dom0.end(tx)


def test_start_needs_one_string(dom0):
    assert dom0.err(XsType.TRANSACTION_START, b"") == "EINVAL"
    assert dom0.err(XsType.TRANSACTION_START, b"\0\0") == "EINVAL"


def test_watch_ignores_tx_id(dom0):
    assert dom0.call(XsType.WATCH, b"/w\0tok\0", tx=99) == b"OK\0"


def test_events_only_on_commit(dom0, make_client):
    watcher = make_client(0)
    watcher.watch("/w", "t")
    watcher.take_events()
    tx = dom0.start()
    dom0.write("/w/a", "1", tx=tx)
    assert watcher.take_events() == []
    dom0.end(tx)
    assert watcher.take_events() == [("/w/a", "t")]
    tx = dom0.start()
    dom0.write("/w/b", "1", tx=tx)
    dom0.end(tx, commit=False)
    assert watcher.take_events() == []


def test_no_events_on_failed_commit(dom0, make_client):
    watcher, other = make_client(0), make_client(0)
    dom0.write("/w/a", "0")
    watcher.watch("/w", "t")
    tx = dom0.start()
    dom0.write("/w/a", "1", tx=tx)
    other.write("/w/a", "2")
    watcher.take_events()
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"
    assert watcher.take_events() == []


def test_rm_inside_transaction(dom0):
    dom0.write("/r/a/b", "1")
    tx = dom0.start()
    dom0.rm("/r", tx=tx)
    assert dom0.err(XsType.READ, b"/r/a\0", tx) == "ENOENT"
    assert dom0.read("/r/a/b") == b"1"
    dom0.end(tx)
    assert dom0.err(XsType.READ, b"/r/a/b\0") == "ENOENT"
    assert dom0.core.store.check() == []


def test_transaction_quota_for_guests(core, make_client):
    guest = make_client(5)
    ids = [guest.start() for _ in range(core.quotas.transactions)]
    assert guest.err(XsType.TRANSACTION_START, b"\0") == "ENOSPC"
    guest.end(ids[0], commit=False)
    guest.start()


def test_transaction_nodes_quota(core, dom0, make_client):
    guest = make_client(5)
    dom0.mkdir("/local/domain/5")
    dom0.chmod("/local/domain/5", "b5")
    core.quotas.transaction_nodes = 8
    tx = guest.start()
    for i in range(5):
        guest.write(f"/local/domain/5/n{i}", "x", tx=tx)
    assert guest.err(XsType.WRITE, b"/local/domain/5/m/a/b/c\0x", tx) == "ENOSPC"


def test_reset_watches_drops_transactions(dom0):
    tx = dom0.start()
    dom0.call(XsType.RESET_WATCHES, b"\0")
    assert dom0.err(XsType.READ, b"/\0", tx) == "ENOENT"


def test_tx_id_wraps_and_skips_zero(dom0):
    dom0.conn.next_tx_id = 0xFFFFFFFF
    assert dom0.start() == 0xFFFFFFFF
    assert dom0.start() == 1


# ---------------------------------------------------------------- reference model
KEYS = [f"/k/{i}" for i in range(4)]
PARENT = "/k"


class TxModel:
    """Reference semantics: per-node versions; a transaction records the version
    of every node it touches first; commit fails iff any of them changed."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {k: b"init" for k in KEYS}
        self.versions: dict[str, int] = {k: 0 for k in KEYS + [PARENT]}
        self.clock = 0

    def bump(self, path: str) -> None:
        self.clock += 1
        self.versions[path] = self.clock


class ClientState:
    def __init__(self) -> None:
        self.tx: int | None = None
        self.overlay: dict[str, bytes | None] = {}
        self.seen: dict[str, int] = {}
        self.parent_changed = False


class TransactionMachine(RuleBasedStateMachine):
    """Two dom0 clients interleave plain and transactional ops on /k/0../k/3."""

    @initialize()
    def setup(self) -> None:
        self.core = Xenstored()
        self.clients = [Direct(self.core), Direct(self.core)]
        self.model = TxModel()
        self.state = [ClientState(), ClientState()]
        for key in KEYS:
            self.clients[0].write(key, "init")
        self.model.versions = {k: 0 for k in KEYS + [PARENT]}

    # -- model helpers -------------------------------------------------------
    def _view(self, c: int, key: str) -> bytes | None:
        st_ = self.state[c]
        if st_.tx is not None and key in st_.overlay:
            return st_.overlay[key]
        return self.model.values.get(key)

    def _touch(self, c: int, path: str) -> None:
        st_ = self.state[c]
        if st_.tx is not None and path not in st_.seen:
            st_.seen[path] = self.model.versions[path]

    def _global_write(self, key: str, value: bytes | None) -> None:
        existed = key in self.model.values
        if value is None:
            if existed:
                del self.model.values[key]
                self.model.bump(key)
                self.model.bump(PARENT)
            return
        self.model.values[key] = value
        self.model.bump(key)
        if not existed:
            self.model.bump(PARENT)

    # -- rules -----------------------------------------------------------------
    @rule(c=st.integers(0, 1))
    def start(self, c: int) -> None:
        if self.state[c].tx is None:
            self.state[c] = ClientState()
            self.state[c].tx = self.clients[c].start()

    @rule(c=st.integers(0, 1), key=st.sampled_from(KEYS))
    def read(self, c: int, key: str) -> None:
        st_ = self.state[c]
        self._touch(c, key)
        expected = self._view(c, key)
        if expected is None:
            self._touch(c, PARENT)
            assert self.clients[c].err(XsType.READ, key.encode() + b"\0", st_.tx or 0) == "ENOENT"
        else:
            assert self.clients[c].read(key, tx=st_.tx or 0) == expected

    @rule(c=st.integers(0, 1), key=st.sampled_from(KEYS), value=st.binary(max_size=4))
    def write(self, c: int, key: str, value: bytes) -> None:
        st_ = self.state[c]
        self.clients[c].write(key, value, tx=st_.tx or 0)
        if st_.tx is None:
            self._global_write(key, value)
            return
        self._touch(c, key)
        if self._view(c, key) is None:
            self._touch(c, PARENT)
        st_.overlay[key] = value

    @rule(c=st.integers(0, 1), key=st.sampled_from(KEYS))
    def rm(self, c: int, key: str) -> None:
        st_ = self.state[c]
        self.clients[c].rm(key, tx=st_.tx or 0)
        if st_.tx is None:
            self._global_write(key, None)
            return
        self._touch(c, key)
        self._touch(c, PARENT)
        st_.overlay[key] = None

    @rule(c=st.integers(0, 1))
    def directory(self, c: int) -> None:
        st_ = self.state[c]
        self._touch(c, PARENT)
        listing = sorted(self.clients[c].ls(PARENT, tx=st_.tx or 0))
        # Nodes are read lazily (as in C): once something the transaction saw
        # has changed, its view may mix old and new state -- but it is then
        # doomed to EAGAIN, which the end rule checks.
        if any(self.model.versions[p] != v for p, v in st_.seen.items()):
            return
        names = sorted(k for k in KEYS if self._view(c, k) is not None)
        assert listing == [n.rsplit("/", 1)[1] for n in names]

    @rule(c=st.integers(0, 1), commit=st.booleans())
    def end(self, c: int, commit: bool) -> None:
        st_ = self.state[c]
        if st_.tx is None:
            return
        ok = all(self.model.versions[p] == v for p, v in st_.seen.items())
        if not commit:
            self.clients[c].end(st_.tx, commit=False)
        elif ok:
            self.clients[c].end(st_.tx)
            for key, value in st_.overlay.items():
                self._global_write(key, value)
        else:
            assert self.clients[c].err(XsType.TRANSACTION_END, b"T\0", st_.tx) == "EAGAIN"
        self.state[c] = ClientState()

    @invariant()
    def committed_state_matches(self) -> None:
        if not hasattr(self, "core"):
            return
        nodes = self.core.store.nodes
        actual = {k: nodes[k].value for k in KEYS if k in nodes}
        assert actual == self.model.values


TransactionMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestTransactionModel = TransactionMachine.TestCase
