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
