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


def test_read_keeps_first_value_after_outside_write(dom0, make_client):
    # C xenstored: "Read type accesses will copy the node to the transaction
    # specific data base part" -- a second read sees that copy.
    other = make_client(0)
    dom0.write("/a", "1")
    tx = dom0.start()
    assert dom0.read("/a", tx=tx) == b"1"
    other.write("/a", "2")
    assert dom0.read("/a", tx=tx) == b"1"
    dom0.write("/a", "mine", tx=tx)
    assert dom0.read("/a", tx=tx) == b"mine"
    assert other.read("/a") == b"2"
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"
    assert other.read("/a") == b"2"


def test_directory_keeps_first_listing_after_outside_change(dom0, make_client):
    other = make_client(0)
    dom0.write("/d/a", "")
    tx = dom0.start()
    assert dom0.ls("/d", tx=tx) == ["a"]
    other.write("/d/b", "")
    other.rm("/d/a")
    assert dom0.ls("/d", tx=tx) == ["a"]
    gen = dom0.call(XsType.DIRECTORY_PART, b"/d\x000\0", tx).split(b"\0")[0]
    assert dom0.call(XsType.DIRECTORY_PART, b"/d\x000\0", tx).split(b"\0")[0] == gen
    dom0.write("/d/c", "", tx=tx)
    assert dom0.ls("/d", tx=tx) == ["a", "c"]
    assert dom0.ls("/d") == ["b"]
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"
    assert dom0.ls("/d") == ["b"]


def test_get_perms_keeps_first_value_after_outside_chmod(dom0, make_client):
    other = make_client(0)
    dom0.write("/p", "")
    tx = dom0.start()
    assert dom0.perms("/p", tx=tx) == ["n0"]
    other.chmod("/p", "r0", "b5")
    assert dom0.perms("/p", tx=tx) == ["n0"]
    dom0.chmod("/p", "b0", tx=tx)
    assert dom0.perms("/p", tx=tx) == ["b0"]
    assert other.perms("/p") == ["r0", "b5"]
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"
    assert other.perms("/p") == ["r0", "b5"]


def test_missing_node_stays_missing_after_outside_create(dom0, make_client):
    other = make_client(0)
    dom0.write("/d", "")
    tx = dom0.start()
    assert dom0.err(XsType.READ, b"/d/n\0", tx) == "ENOENT"
    other.write("/d/n", "now")
    assert dom0.err(XsType.READ, b"/d/n\0", tx) == "ENOENT"
    assert dom0.err(XsType.GET_PERMS, b"/d/n\0", tx) == "ENOENT"
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"


def test_existing_node_stays_after_outside_rm(dom0, make_client):
    other = make_client(0)
    dom0.write("/d/n", "v")
    tx = dom0.start()
    assert dom0.read("/d/n", tx=tx) == b"v"
    other.rm("/d/n")
    assert dom0.read("/d/n", tx=tx) == b"v"
    assert dom0.perms("/d/n", tx=tx) == ["n0"]
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"
    assert dom0.err(XsType.READ, b"/d/n\0") == "ENOENT"


def test_create_under_stale_listing_adds_no_duplicate(dom0, make_client):
    # The transaction's copy of /d still lists "n", which was removed outside;
    # recreating "n" inside the transaction must not list it twice.
    other = make_client(0)
    dom0.write("/d/n", "v")
    tx = dom0.start()
    assert dom0.ls("/d", tx=tx) == ["n"]
    other.rm("/d/n")
    dom0.write("/d/n", "again", tx=tx)
    assert dom0.ls("/d", tx=tx) == ["n"]
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"


def test_release_strips_perms_with_new_generation(core, dom0, make_client):
    # Committed nodes are immutable: dropping a released domain's entry is a
    # new node version, so a transaction that read the old one keeps seeing it
    # and fails with EAGAIN.
    make_client(6)
    dom0.write("/shared", "")
    dom0.chmod("/shared", "n0", "r6")
    old_gen = core.store.nodes["/shared"].generation
    tx = dom0.start()
    assert dom0.perms("/shared", tx=tx) == ["n0", "r6"]
    core.release_domain(6)
    assert dom0.perms("/shared") == ["n0"]
    assert core.store.nodes["/shared"].generation > old_gen
    assert dom0.perms("/shared", tx=tx) == ["n0", "r6"]
    assert dom0.err(XsType.TRANSACTION_END, b"T\0", tx) == "EAGAIN"


def test_release_removing_owned_node_conflicts(core, dom0, make_client):
    make_client(6)
    dom0.write("/local/domain/6/x", "1")
    dom0.chmod("/local/domain/6/x", "n6")
    tx = dom0.start()
    assert dom0.read("/local/domain/6/x", tx=tx) == b"1"
    core.release_domain(6)
    assert dom0.err(XsType.READ, b"/local/domain/6/x\0") == "ENOENT"
    assert dom0.read("/local/domain/6/x", tx=tx) == b"1"
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
KEYS = [f"/k/{i}" for i in range(3)]
PARENT = "/k"
GUEST = 5                                   # the domain the restart rule releases
PERM_LISTS = [("n0",), ("r0",), ("n0", "r5"), ("n5",), ("b0", "w5", "r7")]
INITIAL_PERMS = dict(zip(KEYS, [("n0",), ("n0", "r5"), ("n5",)]))   # release hits at once
MISSING = -1                                # the version of a missing node (C NO_GENERATION)

ModelNode = tuple[bytes, tuple[str, ...]]   # (value, perms in wire form)


class TxModel:
    """The committed tree under /k: key -> (value, perms), and a version per
    path that changes exactly when the real node gets a new generation."""

    def __init__(self) -> None:
        self.nodes: dict[str, ModelNode] = {k: (b"init", INITIAL_PERMS[k]) for k in KEYS}
        self.versions: dict[str, int] = {k: 0 for k in KEYS + [PARENT]}
        self.clock = 0

    def bump(self, path: str) -> None:
        self.clock += 1
        self.versions[path] = self.clock

    def set(self, key: str, node: ModelNode | None) -> None:
        """Store or remove ``key`` (outside any transaction, or at commit)."""
        existed = key in self.nodes
        if node is None:
            if existed:
                del self.nodes[key]
                self.versions[key] = MISSING
                self.bump(PARENT)
            return
        self.nodes[key] = node
        self.bump(key)
        if not existed:
            self.bump(PARENT)

    def children(self) -> set[str]:
        return {k.rsplit("/", 1)[1] for k in self.nodes}


class ClientState:
    """One client's open transaction: what C calls the accessed nodes."""

    def __init__(self, tx: int | None = None) -> None:
        self.tx = tx
        self.copy: dict[str, ModelNode | None] = {}   # key as first seen / as we changed it
        self.children: set[str] | None = None          # our copy of PARENT's child list
        self.seen: dict[str, int] = {}                 # version at first read
        self.dirty: dict[str, None] = {}               # keys we changed
        self.parent_dirty = False


class TransactionMachine(RuleBasedStateMachine):
    """Two dom0 clients interleave plain and transactional ops on /k/0../k/3,
    while perms change and domain 5 comes and goes.

    The model follows C xenstored: the first access to a node inside a
    transaction copies it in and records its version; later accesses see the
    copy (or the transaction's own change), never outside changes; commit
    fails with EAGAIN iff a recorded version changed.  Nodes are copied lazily,
    so a doomed transaction may combine copies taken at different times --
    the model tracks each copy, so even those reads are checked exactly.
    """

    @initialize()
    def setup(self) -> None:
        self.core = Xenstored()
        self.clients = [Direct(self.core), Direct(self.core)]
        self.toolstack = Direct(self.core)      # dom0 outside any transaction
        self.model = TxModel()
        self.state = [ClientState(), ClientState()]
        for key in KEYS:
            self.clients[0].write(key, "init")
            self.clients[0].chmod(key, *INITIAL_PERMS[key])
        self.model.versions = {k: 0 for k in KEYS + [PARENT]}

    # -- the model's transaction view ---------------------------------------------
    def _key(self, c: int, key: str) -> ModelNode | None:
        """``key`` as client ``c`` sees it; the first access in a tx copies it."""
        st_ = self.state[c]
        if st_.tx is None:
            return self.model.nodes.get(key)
        if key not in st_.copy:
            st_.copy[key] = self.model.nodes.get(key)
            st_.seen[key] = self.model.versions[key]
        return st_.copy[key]

    def _children(self, c: int) -> set[str]:
        """PARENT's child names as client ``c`` sees them (copied on first access)."""
        st_ = self.state[c]
        if st_.tx is None:
            return self.model.children()
        if st_.children is None:
            st_.children = self.model.children()
            st_.seen[PARENT] = self.model.versions[PARENT]
        return st_.children

    def _change(self, c: int, key: str, node: ModelNode | None) -> None:
        st_ = self.state[c]
        if st_.tx is None:
            self.model.set(key, node)
        else:
            st_.copy[key] = node
            st_.dirty[key] = None

    # -- rules ---------------------------------------------------------------------
    @rule(c=st.integers(0, 1))
    def start(self, c: int) -> None:
        if self.state[c].tx is None:
            self.state[c] = ClientState(self.clients[c].start())

    @rule(c=st.integers(0, 1), key=st.sampled_from(KEYS))
    def read(self, c: int, key: str) -> None:
        tx = self.state[c].tx or 0
        node = self._key(c, key)
        if node is None:
            self._children(c)                   # ENOENT is checked against the parent
            assert self.clients[c].err(XsType.READ, key.encode() + b"\0", tx) == "ENOENT"
        else:
            assert self.clients[c].read(key, tx=tx) == node[0]

    @rule(c=st.integers(0, 1), key=st.sampled_from(KEYS))
    def get_perms(self, c: int, key: str) -> None:
        tx = self.state[c].tx or 0
        node = self._key(c, key)
        if node is None:
            self._children(c)
            assert self.clients[c].err(XsType.GET_PERMS, key.encode() + b"\0", tx) == "ENOENT"
        else:
            assert tuple(self.clients[c].perms(key, tx=tx)) == node[1]

    @rule(c=st.integers(0, 1), key=st.sampled_from(KEYS), value=st.binary(max_size=4))
    def write(self, c: int, key: str, value: bytes) -> None:
        st_ = self.state[c]
        self.clients[c].write(key, value, tx=st_.tx or 0)
        node = self._key(c, key)
        if node is not None:
            self._change(c, key, (value, node[1]))
            return
        children = self._children(c)            # created: PARENT lists it (once)
        if st_.tx is not None:
            children.add(key.rsplit("/", 1)[1])
            st_.parent_dirty = True
        self._change(c, key, (value, ("n0",)))  # inherits PARENT's n0

    @rule(c=st.integers(0, 1), key=st.sampled_from(KEYS))
    def rm(self, c: int, key: str) -> None:
        st_ = self.state[c]
        self.clients[c].rm(key, tx=st_.tx or 0)
        node = self._key(c, key)
        children = self._children(c)            # looked up either way
        if node is None:
            return                              # missing, parent exists: no change
        if st_.tx is not None:
            children.discard(key.rsplit("/", 1)[1])
            st_.parent_dirty = True
        self._change(c, key, None)

    @rule(c=st.integers(0, 1), key=st.sampled_from(KEYS), perms=st.sampled_from(PERM_LISTS))
    def set_perms(self, c: int, key: str, perms: tuple[str, ...]) -> None:
        tx = self.state[c].tx or 0
        node = self._key(c, key)
        if node is None:
            self._children(c)
            payload = key.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms)
            assert self.clients[c].err(XsType.SET_PERMS, payload, tx) == "ENOENT"
            return
        self.clients[c].chmod(key, *perms, tx=tx)
        self._change(c, key, (node[0], perms))

    @rule(c=st.integers(0, 1))
    def directory(self, c: int) -> None:
        st_ = self.state[c]
        listing = sorted(self.clients[c].ls(PARENT, tx=st_.tx or 0))
        assert listing == sorted(self._children(c))

    @rule(grant=st.sampled_from(KEYS))
    def restart_guest(self, grant: str) -> None:
        """Domain 5 goes away -- nodes it owns are removed, its entries dropped,
        each a new node version, so transactions that read them must fail --
        and a new domain 5 is introduced and granted read access to ``grant``."""
        self.core.introduce_domain(GUEST)
        self.core.release_domain(GUEST)
        for key, (value, perms) in list(self.model.nodes.items()):
            if perms[0][1:] == str(GUEST):
                self.model.set(key, None)
            elif any(p[1:] == str(GUEST) for p in perms[1:]):
                self.model.set(key, (value, tuple(p for p in perms if p[1:] != str(GUEST))))
        self.core.introduce_domain(GUEST)
        if grant in self.model.nodes:
            value, perms = self.model.nodes[grant]
            self.toolstack.chmod(grant, *perms, f"r{GUEST}")
            self.model.set(grant, (value, perms + (f"r{GUEST}",)))

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
            for key in st_.dirty:
                self.model.set(key, st_.copy[key])
            if st_.parent_dirty:
                self.model.bump(PARENT)
        else:
            assert self.clients[c].err(XsType.TRANSACTION_END, b"T\0", st_.tx) == "EAGAIN"
        self.state[c] = ClientState()

    @invariant()
    def transactions_keep_their_copies(self) -> None:
        """Every node an open transaction has accessed still reads as its copy
        (re-reading an accessed node copies nothing new, so this changes no state)."""
        if not hasattr(self, "core"):
            return
        for c, st_ in enumerate(self.state):
            if st_.tx is None:
                continue
            client = self.clients[c]
            for key, node in st_.copy.items():
                if node is None:
                    assert client.err(XsType.READ, key.encode() + b"\0", st_.tx) == "ENOENT"
                else:
                    assert client.read(key, tx=st_.tx) == node[0]
                    assert tuple(client.perms(key, tx=st_.tx)) == node[1]
            if st_.children is not None:
                assert sorted(client.ls(PARENT, tx=st_.tx)) == sorted(st_.children)

    @invariant()
    def committed_state_matches(self) -> None:
        if not hasattr(self, "core"):
            return
        store = self.core.store
        actual = {k: (n.value, tuple(p.wire() for p in n.perms))
                  for k in KEYS if (n := store.nodes.get(k)) is not None}
        assert actual == self.model.nodes
        assert set(store.nodes[PARENT].children) == self.model.children()
        assert len(store.nodes[PARENT].children) == len(self.model.children())


TransactionMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestTransactionModel = TransactionMachine.TestCase
