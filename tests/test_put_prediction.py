"""Duplicate puts follow the stored run (issue 10): after a page matches pool
page P, the next page is compared with P+1 before anything is fingerprinted.
The prediction is only a shortcut: every byte is still compared, and a value
that leaves the stored run (changed pages, shifts, zero pages) is stored
exactly as it is."""
import numpy as np
import pytest

MiB = 1 << 20
PAGE = 4096


def _pages(n, seed):
    return np.random.default_rng(seed).integers(0, 255, n * PAGE, dtype=np.uint8)


@pytest.mark.parametrize("npages", [65, 130, 5000])     # 5000: two threads
def test_exact_duplicate_shares_every_page(store, npages):
    a = _pages(npages, 1)
    store["a"] = a
    used = store.stats()["pages_used"]
    store["b"] = a.copy()
    assert store.stats()["pages_used"] == used
    assert np.array_equal(store["b"], a)
    assert store.check().ok


@pytest.mark.parametrize("where", [0, 63, 64, 100, 199])
def test_changed_page_breaks_the_prediction_cleanly(store, where):
    a = _pages(200, 2)
    store["a"] = a
    used = store.stats()["pages_used"]
    b = a.copy()
    b[where * PAGE + 17] ^= 0xFF
    store["b"] = b
    assert np.array_equal(store["b"], b)
    assert np.array_equal(store["a"], a)
    assert store.stats()["pages_used"] == used + 1      # only the changed page is new
    assert store.check().ok


def test_shifted_and_zero_padded_values(store):
    a = _pages(300, 3)
    store["a"] = a
    shifted = np.concatenate([a[PAGE:], a[:PAGE]])          # rotated by one page
    store["s"] = shifted
    padded = np.concatenate([a[: 100 * PAGE], np.zeros(70 * PAGE, np.uint8), a[100 * PAGE:]])
    store["p"] = padded
    prefix = a[: 150 * PAGE].copy()
    store["x"] = prefix
    for k, v in (("a", a), ("s", shifted), ("p", padded), ("x", prefix)):
        assert np.array_equal(store[k], v), k
    assert store.stats()["pages_used"] == 300               # nothing new: all shared or zero
    assert store.check().ok


def test_prediction_never_uses_a_freed_page(store):
    """The stored run is deleted and its pages reused by other content in
    between: a put that would have followed it must not trust them."""
    a = _pages(256, 4)
    r = store.put(a)
    store.delete(r)
    del r
    others = [store.put(_pages(256, 10 + i)) for i in range(2)]
    b = a.copy()
    store["b"] = b
    assert np.array_equal(store["b"], a)
    assert store.check().ok
    del others


def test_nodedup_values_are_never_predicted_onto(store):
    a = _pages(128, 5)
    store.put(a, key="private", dedup=False)
    used = store.stats()["pages_used"]
    store["public"] = a.copy()
    assert store.stats()["pages_used"] == used + 128
    assert store.check().ok


# ---- the optimistic path: after a piece of all-new pages, the next piece
# takes fresh pages first and fingerprints while copying; what turns out
# not to be new must still be shared, and room must not be asked for it

@pytest.mark.parametrize("npages", [1000, 6000])     # 6000: two threads
def test_new_value_with_zeros_repeats_and_stored_pages(store, npages):
    stored = _pages(40, 7)
    store["old"] = stored
    v = _pages(npages, 8)
    # after several all-new pieces: zero pages, a repeat of an earlier page
    # of the same piece, and pages equal to a stored value's but not where
    # a prediction would look (out of order)
    v[300 * PAGE:302 * PAGE] = 0
    v[330 * PAGE:331 * PAGE] = v[329 * PAGE:330 * PAGE]
    v[400 * PAGE:401 * PAGE] = stored[5 * PAGE:6 * PAGE]
    v[402 * PAGE:403 * PAGE] = stored[30 * PAGE:31 * PAGE]
    used = store.stats()["pages_used"]
    store["v"] = v
    assert np.array_equal(store["v"], v)
    st = store.stats()
    # new pages: all but 2 zero, 1 repeat, 2 stored
    assert st["pages_used"] - used == npages - 5
    assert st["pages_zero"] >= 2
    assert store.check().ok
    # and a copy of it is all shared
    store["w"] = v.copy()
    assert store.stats()["pages_used"] == st["pages_used"]


def test_value_that_fits_only_thanks_to_dedup(make_store):
    """Capacity counts new pages only: a second value that shares all but
    its first 64 pages with the first fits, though the optimistic path
    would have wanted fresh pages for the next piece too."""
    s = make_store(capacity=600 * PAGE, warm_bytes=0)
    a = _pages(512, 9)
    s["a"] = a
    b = a.copy()
    b[: 64 * PAGE] = _pages(64, 10)       # the first piece all new: the next is optimistic
    s["b"] = b                            # 576 pages needed; optimism would want 640
    assert np.array_equal(s["b"], b)
    assert np.array_equal(s["a"], a)
    assert s.check().ok
