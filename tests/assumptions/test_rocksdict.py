"""Pins the rocksdict 0.3.29 behaviours Shoal relies on (raw mode, column families).

If an upgrade changes one of these, the test says which assumption broke:

* an iterator from ``.iter()`` is a point-in-time view from its creation (Store.scan and
  the Snapshot RPC depend on it);
* ``snapshot()`` objects isolate point reads but NOT iteration (the trap snapshot.py avoids);
* a WriteBatch across column families is atomic, and is consumed by its one write;
* with the WAL on and sync off, a written batch survives kill -9 of the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import rocksdict

from tests.harness.wait import wait_for

FAMILIES = ("alpha", "beta", "gamma")


def options() -> rocksdict.Options:
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    return opts


def open_db(path: Path) -> rocksdict.Rdict:
    return rocksdict.Rdict(
        str(path), options(), column_families={name: options() for name in FAMILIES}
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[rocksdict.Rdict]:
    handle = open_db(tmp_path / "db")
    try:
        yield handle
    finally:
        handle.close()


def drain(it: rocksdict.RdictIter) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    while it.valid():
        out.append((it.key(), it.value()))
        it.next()
    return out


def fill(cf: rocksdict.Rdict) -> None:
    for i in range(5):
        cf[b"k%d" % i] = b"v%d" % i


ORIGINAL = [(b"k%d" % i, b"v%d" % i) for i in range(5)]


def mutate(cf: rocksdict.Rdict) -> None:
    cf[b"k9"] = b"added"
    cf[b"k1"] = b"changed"
    del cf[b"k0"]
    cf[b"k25"] = b"between"


AFTER = [
    (b"k1", b"changed"),
    (b"k2", b"v2"),
    (b"k25", b"between"),
    (b"k3", b"v3"),
    (b"k4", b"v4"),
    (b"k9", b"added"),
]


# -- (a) iterators are point-in-time views ------------------------------------------------


def test_iterator_is_a_point_in_time_view(db: rocksdict.Rdict) -> None:
    cf = db.get_column_family("alpha")
    fill(cf)
    it = cf.iter()  # the view is fixed here, before the first seek
    mutate(cf)
    it.seek_to_first()
    assert drain(it) == ORIGINAL
    fresh = cf.iter()
    fresh.seek_to_first()
    assert drain(fresh) == AFTER


def test_iterator_ignores_writes_made_while_iterating(db: rocksdict.Rdict) -> None:
    cf = db.get_column_family("alpha")
    fill(cf)
    it = cf.iter()
    it.seek(b"k1")
    seen = [it.key()]
    it.next()
    del cf[b"k3"]
    cf[b"k2"] = b"overwritten"
    cf[b"k35"] = b"inserted ahead"
    cf[b"k0"] = b"behind"
    while it.valid():
        seen.append(it.key())
        assert it.value() == b"v" + it.key()[1:]
        it.next()
    assert seen == [b"k1", b"k2", b"k3", b"k4"]
    # Seeking again on the same iterator still reads the old view.
    it.seek(b"k3")
    assert (it.key(), it.value()) == (b"k3", b"v3")
    it.seek_to_last()
    assert it.key() == b"k4"


def test_iterator_survives_a_write_batch(db: rocksdict.Rdict) -> None:
    cf = db.get_column_family("alpha")
    fill(cf)
    it = cf.iter()
    batch = rocksdict.WriteBatch(raw_mode=True)
    handle = db.get_column_family_handle("alpha")
    for i in range(5):
        batch.delete(b"k%d" % i, handle)
    db.write(batch)
    it.seek_to_first()
    assert drain(it) == ORIGINAL
    assert cf.get(b"k0") is None


# -- (b) snapshot(): point reads isolated, iteration NOT ----------------------------------


def test_snapshot_point_reads_are_isolated(db: rocksdict.Rdict) -> None:
    cf = db.get_column_family("alpha")
    fill(cf)
    snap = cf.snapshot()
    mutate(cf)
    assert snap[b"k0"] == b"v0"  # deleted since
    assert snap[b"k1"] == b"v1"  # changed since
    with pytest.raises(Exception, match="key not found"):
        snap[b"k9"]  # added since


def test_snapshot_iteration_is_not_isolated(db: rocksdict.Rdict) -> None:
    """THE TRAP: in rocksdict 0.3.29, iterating a Snapshot reads the database as of the
    iterator's creation, not as of the snapshot. Never rely on snapshot() for a consistent
    scan; create the iterator itself at the consistent point (see snapshot.py)."""
    cf = db.get_column_family("alpha")
    fill(cf)
    snap = cf.snapshot()
    mutate(cf)
    it = snap.iter()
    it.seek_to_first()
    assert drain(it) == AFTER  # sees every write made after the snapshot
    assert list(snap.items()) == AFTER
    assert list(snap.keys()) == [k for k, _ in AFTER]
    # ...while point reads on the very same snapshot still see the old data.
    assert snap[b"k1"] == b"v1"


def test_snapshot_iterator_is_fixed_at_its_own_creation(db: rocksdict.Rdict) -> None:
    cf = db.get_column_family("alpha")
    fill(cf)
    snap = cf.snapshot()
    cf[b"k7"] = b"before the iterator"
    it = snap.iter()
    cf[b"k8"] = b"after the iterator"
    it.seek_to_first()
    assert [k for k, _ in drain(it)] == [b"k0", b"k1", b"k2", b"k3", b"k4", b"k7"]


# -- (c) WriteBatch -----------------------------------------------------------------------


def test_write_batch_across_column_families_is_atomic(db: rocksdict.Rdict) -> None:
    handles = {name: db.get_column_family_handle(name) for name in FAMILIES}
    cfs = {name: db.get_column_family(name) for name in FAMILIES}
    cfs["gamma"][b"old"] = b"to delete"
    iterators = {name: cfs[name].iter() for name in FAMILIES}

    batch = rocksdict.WriteBatch(raw_mode=True)
    for name in ("alpha", "beta"):
        for i in range(100):
            batch.put(b"%s-%03d" % (name.encode(), i), b"x" * i, handles[name])
    batch.delete(b"old", handles["gamma"])
    batch.put(b"new", b"1", handles["gamma"])
    assert batch.len() == 202
    # Nothing is visible before the write...
    assert cfs["alpha"].get(b"alpha-000") is None
    assert cfs["beta"].get(b"beta-099") is None
    assert cfs["gamma"][b"old"] == b"to delete"
    sequence = db.latest_sequence_number()

    db.write(batch)

    # ...everything after it, in every family, under consecutive sequence numbers.
    assert db.latest_sequence_number() == sequence + 202
    assert len(list(cfs["alpha"].keys())) == 100
    assert len(list(cfs["beta"].keys())) == 100
    assert cfs["beta"][b"beta-099"] == b"x" * 99
    assert list(cfs["gamma"].items()) == [(b"new", b"1")]
    # Views from before the write see none of it.
    for name, it in iterators.items():
        it.seek_to_first()
        assert drain(it) == ([(b"old", b"to delete")] if name == "gamma" else [])


def test_write_batch_is_consumed_by_its_write(db: rocksdict.Rdict) -> None:
    handle = db.get_column_family_handle("alpha")
    batch = rocksdict.WriteBatch(raw_mode=True)
    batch.put(b"k", b"v", handle)
    db.write(batch)
    sequence = db.latest_sequence_number()
    with pytest.raises(Exception, match="already consumed"):
        db.write(batch)
    with pytest.raises(Exception, match="already consumed"):
        batch.put(b"k2", b"v2", handle)
    assert db.latest_sequence_number() == sequence
    assert db.get_column_family("alpha").get(b"k2") is None


def test_missing_keys_read_as_none(db: rocksdict.Rdict) -> None:
    cf = db.get_column_family("alpha")
    cf[b"a"] = b"1"
    assert cf.get(b"nope") is None
    assert cf.get([b"a", b"nope"]) == [b"1", None]


# -- (d) durability across kill -9 --------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, time
    import rocksdict

    def options():
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.create_missing_column_families(True)
        return opts

    families = {families!r}
    db = rocksdict.Rdict(sys.argv[1], options(), column_families={{n: options() for n in families}})
    batch = rocksdict.WriteBatch(raw_mode=True)
    for name in families:
        handle = db.get_column_family_handle(name)
        for i in range(50):
            batch.put(b"%s-%03d" % (name.encode(), i), b"value-%d" % i, handle)
    write_options = rocksdict.WriteOptions()
    write_options.sync = False  # WAL on (the default), no fsync: what Shoal runs by default
    db.write(batch, write_options)
    print("written", flush=True)
    while True:
        time.sleep(60)
    """
).format(families=FAMILIES)


def test_a_written_batch_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        os.set_blocking(proc.stdout.fileno(), False)
        output = bytearray()

        def written_or_exited() -> bool:
            chunk = proc.stdout.read() if proc.stdout else None
            if chunk:
                output.extend(chunk)
            return b"written\n" in output or proc.poll() is not None

        wait_for(written_or_exited, timeout=60, what="the writer to write its batch")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert output == b"written\n"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    reopened = open_db(path)
    try:
        for name in FAMILIES:
            items = list(reopened.get_column_family(name).items())
            assert items == [(b"%s-%03d" % (name.encode(), i), b"value-%d" % i) for i in range(50)]
    finally:
        reopened.close()
