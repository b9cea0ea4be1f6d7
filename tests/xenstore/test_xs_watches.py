"""Watches: unit tests plus a hypothesis state machine against a reference model."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from xsdirect import Direct
from xenkvm.xenstore.dispatch import Xenstored
from xenkvm.xenstore.paths import is_child
from xenkvm.xenstore.protocol import Message, XsType


def test_watch_fires_once_on_registration_after_ok(dom0):
    assert dom0.raw(XsType.WATCH, b"/w\0tok\0") == (XsType.WATCH, b"OK\0")
    assert dom0.events == [("/w", "tok")]


def test_watch_fires_for_path_and_descendants_only(dom0, make_client):
    watcher = make_client(0)
    watcher.watch("/w", "t")
    watcher.take_events()
    dom0.write("/w", "1")
    dom0.write("/w/a/b", "1")
    dom0.write("/wx", "1")
    dom0.write("/other", "1")
    assert watcher.take_events() == [("/w", "t"), ("/w/a/b", "t")]


def test_root_watch_sees_everything(dom0, make_client):
    watcher = make_client(0)
    watcher.watch("/", "r")
    watcher.take_events()
    dom0.write("/a/b", "1")
    assert watcher.take_events() == [("/a/b", "r")]


def test_own_writes_fire_own_watches_before_reply(dom0):
    dom0.watch("/w", "t")
    dom0.take_events()
    dom0.write("/w/x", "1")
    assert dom0.events == [("/w/x", "t")]


def test_mkdir_fires_only_when_creating(dom0, make_client):
    watcher = make_client(0)
    dom0.write("/w", "")
    watcher.watch("/w", "t")
    watcher.take_events()
    dom0.mkdir("/w")
    assert watcher.take_events() == []
    dom0.mkdir("/w/new")
    assert watcher.take_events() == [("/w/new", "t")]


def test_set_perms_fires(dom0, make_client):
    watcher = make_client(0)
    dom0.write("/w", "")
    watcher.watch("/w", "t")
    watcher.take_events()
    dom0.chmod("/w", "r0")
    assert watcher.take_events() == [("/w", "t")]


def test_rm_fires_for_every_removed_node(dom0, make_client):
    watcher = make_client(0)
    dom0.write("/r/a/b", "")
    dom0.write("/r/c", "")
    for path in ("/", "/r", "/r/a", "/r/a/b", "/r/c", "/r/a/b/none"):
        watcher.watch(path, path)
    watcher.take_events()
    dom0.rm("/r")
    got = Counter(watcher.take_events())
    assert got == Counter({("/r", "/"): 1, ("/r", "/r"): 1, ("/r/a", "/r/a"): 1,
                           ("/r/a/b", "/r/a/b"): 1, ("/r/c", "/r/c"): 1})


def test_rm_of_missing_node_fires_nothing(dom0, make_client):
    watcher = make_client(0)
    dom0.write("/r", "")
    watcher.watch("/r", "t")
    watcher.take_events()
    dom0.rm("/r/none")
    assert watcher.take_events() == []


def test_relative_watch_gets_relative_events(core, dom0, make_client):
    guest = make_client(5)
    dom0.mkdir("/local/domain/5")
    dom0.chmod("/local/domain/5", "b5")
    guest.watch("device", "rel")
    guest.watch("/local/domain/5/device", "abs")
    assert guest.take_events() == [("device", "rel"), ("/local/domain/5/device", "abs")]
    dom0.write("/local/domain/5/device/vif/0", "x")
    assert sorted(guest.take_events()) == [("/local/domain/5/device/vif/0", "abs"),
                                           ("device/vif/0", "rel")]


def test_duplicate_watch_eexist_but_other_token_ok(dom0):
    dom0.watch("/w", "a")
    assert dom0.err(XsType.WATCH, b"/w\0a\0") == "EEXIST"
    dom0.watch("/w", "b")


def test_unwatch_matches_path_and_token_exactly(dom0, make_client):
    watcher = make_client(0)
    watcher.watch("/w", "one")
    watcher.watch("/w", "two")
    watcher.take_events()
    assert watcher.err(XsType.UNWATCH, b"/w\0three\0") == "ENOENT"
    assert watcher.err(XsType.UNWATCH, b"/w/x\0one\0") == "ENOENT"
    watcher.unwatch("/w", "two")
    dom0.write("/w", "1")
    assert watcher.take_events() == [("/w", "one")]
    watcher.unwatch("/w", "one")
    dom0.write("/w", "2")
    assert watcher.take_events() == []


def test_unwatch_relative_path(dom0):
    dom0.watch("rel", "t")
    dom0.unwatch("/local/domain/0/rel", "t")


def test_watch_bad_arguments(dom0):
    assert dom0.err(XsType.WATCH, b"/w\0") == "EINVAL"
    assert dom0.err(XsType.WATCH, b"/w\0t") == "EINVAL"
    assert dom0.err(XsType.WATCH, b"/w\0t\0x\0") == "EINVAL"
    assert dom0.err(XsType.WATCH, b"/w//x\0t\0") == "EINVAL"
    assert dom0.err(XsType.UNWATCH, b"/w\0") == "EINVAL"


def test_reset_watches(dom0):
    dom0.watch("/w", "t")
    dom0.take_events()
    dom0.call(XsType.RESET_WATCHES, b"\0")
    dom0.write("/w", "1")
    assert dom0.take_events() == []
    dom0.watch("/w", "t")   # no EEXIST after reset


def test_guest_does_not_see_unreadable_nodes(dom0, make_client):
    guest = make_client(5)
    guest.watch("/", "t")
    guest.take_events()
    dom0.write("/secret", "x")
    assert guest.take_events() == []
    dom0.write("/pub", "x")
    dom0.chmod("/pub", "r0")
    assert guest.take_events() == [("/pub", "t")]


def test_guest_sees_node_made_unreadable(dom0, make_client):
    guest = make_client(5)
    dom0.write("/pub", "x")
    dom0.chmod("/pub", "r0")
    guest.watch("/pub", "t")
    guest.take_events()
    dom0.chmod("/pub", "n0")   # old perms were readable
    assert guest.take_events() == [("/pub", "t")]


def test_guest_sees_removal_of_readable_node(dom0, make_client):
    guest = make_client(5)
    dom0.write("/pub/x", "x")
    dom0.chmod("/pub/x", "r0")
    guest.watch("/pub/x", "t")
    guest.take_events()
    dom0.rm("/pub")
    assert guest.take_events() == [("/pub/x", "t")]


def test_events_queue_while_reply_pending(core, dom0, make_client):
    """Events for a connection are queued behind a reply not yet written out."""
    watcher = make_client(0)
    watcher.watch("/w", "t")
    watcher.take_events()
    with core.lock:
        core.handle(watcher.conn, Message(XsType.READ, 77, 0, b"/tool\0"))
    for i in range(3):
        dom0.write(f"/w/{i}", "x")
    # The reply is still queued; the events went in behind it, none lost.
    assert watcher.conn.out.replies == 1 and watcher.conn.out.events == 3
    assert watcher.drain() == [(XsType.READ, b"")]
    assert watcher.events == [("/w/0", "t"), ("/w/1", "t"), ("/w/2", "t")]


def test_watch_quota_e2big(core, make_client):
    guest = make_client(5)
    for i in range(core.quotas.watches):
        guest.watch(f"/w{i}", "t")
    assert guest.err(XsType.WATCH, b"/wlast\0t\0") == "E2BIG"


def test_overlong_event_is_dropped(dom0):
    token = "t" * 4000
    dom0.watch("/w", token)
    dom0.take_events()
    dom0.write("/w/" + "x" * 200, "1")
    assert dom0.take_events() == []


def test_special_watches_fire(core, dom0, make_client):
    dom0.watch("@introduceDomain", "in")
    dom0.watch("@releaseDomain", "out")
    dom0.watch("/", "root")
    dom0.take_events()
    dom0.call(XsType.INTRODUCE, b"3\x000\x005\0")
    assert dom0.take_events() == [("@introduceDomain", "in")]
    dom0.call(XsType.RELEASE, b"3\0")
    assert dom0.take_events() == [("@releaseDomain", "out")]


def test_special_watches_need_permission(core, dom0, make_client):
    guest = make_client(5)
    guest.watch("@introduceDomain", "in")
    guest.take_events()
    core.introduce_domain(6)
    assert guest.take_events() == []
    dom0.chmod("@introduceDomain", "n0", "r5")
    core.introduce_domain(7)
    assert guest.take_events() == [("@introduceDomain", "in")]


def test_special_events_not_deduplicated(core, dom0):
    dom0.watch("@introduceDomain", "in")
    dom0.take_events()
    core.introduce_domain(6)
    core.introduce_domain(7)
    assert dom0.take_events() == [("@introduceDomain", "in")] * 2


def test_identical_pending_events_are_coalesced(core, dom0, make_client):
    watcher = make_client(0)
    watcher.watch("/w", "t")
    watcher.take_events()
    dom0.write("/w", "1")
    dom0.write("/w", "2")
    assert watcher.take_events() == [("/w", "t")]
    dom0.write("/w", "3")
    assert watcher.take_events() == [("/w", "t")]


# ---------------------------------------------------------------- reference model
PATHS = ["/a", "/a/b", "/a/b/c", "/a/d", "/e"]
WATCH_PATHS = ["/", "/a", "/a/b", "/a/b/c", "/a/d", "/e", "/a/x"]


def _subtree(existing: set[str], path: str) -> list[str]:
    return [p for p in existing if is_child(p, path)]


class WatchMachine(RuleBasedStateMachine):
    """dom0 mutates a small tree; two privileged watchers; expected events computed
    from the documented rules (path + descendants; RM fires per removed node)."""

    @initialize()
    def setup(self) -> None:
        self.core = Xenstored()
        self.writer = Direct(self.core)
        self.watchers = [Direct(self.core), Direct(self.core)]
        self.watches: list[set[tuple[str, str]]] = [set(), set()]
        self.existing: set[str] = set()
        self.tx: int | None = None
        self.tx_events: list[str] | None = None
        self.tx_exact: list[str] = []

    def _expect(self, nonexact: list[str], exact: list[str]) -> list[Counter]:
        out = []
        for watches in self.watches:
            got = set()
            for path in nonexact:
                got |= {(path, tok) for wp, tok in watches if is_child(path, wp)}
            for path in exact:
                got |= {(path, tok) for wp, tok in watches if wp == path}
            out.append(Counter(got))
        return out

    def _check(self, nonexact: list[str], exact: list[str]) -> None:
        expected = self._expect(nonexact, exact)
        for watcher, exp in zip(self.watchers, expected):
            assert Counter(watcher.take_events()) == exp

    def _mutate(self, nonexact: list[str], exact: list[str]) -> None:
        if self.tx is None:
            self._check(nonexact, exact)
        else:
            self.tx_events += nonexact
            self.tx_exact += exact
            self._check([], [])

    @rule(w=st.integers(0, 1), path=st.sampled_from(WATCH_PATHS), token=st.sampled_from("xy"))
    def watch(self, w: int, path: str, token: str) -> None:
        if (path, token) in self.watches[w]:
            assert self.watchers[w].err(XsType.WATCH, f"{path}\0{token}\0".encode()) == "EEXIST"
            return
        self.watchers[w].watch(path, token)
        self.watches[w].add((path, token))
        assert self.watchers[w].take_events() == [(path, token)]

    @rule(w=st.integers(0, 1), path=st.sampled_from(WATCH_PATHS), token=st.sampled_from("xy"))
    def unwatch(self, w: int, path: str, token: str) -> None:
        if (path, token) in self.watches[w]:
            self.watchers[w].unwatch(path, token)
            self.watches[w].discard((path, token))
        else:
            assert self.watchers[w].err(XsType.UNWATCH,
                                        f"{path}\0{token}\0".encode()) == "ENOENT"

    @rule(path=st.sampled_from(PATHS))
    def write(self, path: str) -> None:
        self.writer.write(path, "v", tx=self.tx or 0)
        parts = path.split("/")[1:]
        self.existing |= {"/" + "/".join(parts[:i + 1]) for i in range(len(parts))}
        self._mutate([path], [])

    @rule(path=st.sampled_from(PATHS))
    def mkdir(self, path: str) -> None:
        existed = path in self.existing
        self.writer.mkdir(path, tx=self.tx or 0)
        parts = path.split("/")[1:]
        self.existing |= {"/" + "/".join(parts[:i + 1]) for i in range(len(parts))}
        self._mutate([] if existed else [path], [])

    @rule(path=st.sampled_from(PATHS))
    def rm(self, path: str) -> None:
        parent = path.rsplit("/", 1)[0] or "/"
        if parent != "/" and parent not in self.existing:
            assert self.writer.err(XsType.RM, path.encode() + b"\0", self.tx or 0) == "ENOENT"
            return
        self.writer.rm(path, tx=self.tx or 0)
        if path not in self.existing:
            self._mutate([], [])
            return
        removed = _subtree(self.existing, path)
        self.existing -= set(removed)
        self._mutate([path], removed)

    @rule()
    def start(self) -> None:
        if self.tx is None:
            self.tx = self.writer.start()
            self.tx_events, self.tx_exact = [], []
            self.tx_existing = set(self.existing)

    @rule(commit=st.booleans())
    def end(self, commit: bool) -> None:
        if self.tx is None:
            return
        self.writer.end(self.tx, commit)
        self.tx = None
        if commit:
            self._check(self.tx_events, self.tx_exact)
        else:
            self.existing = self.tx_existing
            self._check([], [])


WatchMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestWatchModel = WatchMachine.TestCase


def test_guest_event_queue_is_capped(core, dom0, make_client):
    guest = make_client(5)
    core.quotas.watch_events = 3
    dom0.write("/pub", "")
    dom0.chmod("/pub", "r0")
    guest.watch("/pub", "t")
    guest.take_events()
    for i in range(10):
        dom0.write(f"/pub/{i}", "")
    assert len(guest.take_events()) == 3
    dom0.write("/pub/again", "")
    assert guest.take_events() == [("/pub/again", "t")]
