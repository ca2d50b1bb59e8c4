"""A short crash campaign (tests/crash_campaign.py): 200 SIGKILLs at random
instants of random store work; after each, gc() and check() are clean and
every completed put is intact."""
import pytest

import crash_campaign


@pytest.mark.limit(600)
def test_crash_campaign_200_kills():
    r = crash_campaign.run(200, seed=1, verbose=False)
    print(r)
    assert r["kills"] == 200
    assert r["mismatches"] == 0
    assert r["empty_after_delete"]
    assert r["max_lock_wait_ms"] < 1000
    assert r["reaped_clients"] >= 150          # gc really reaped the killed workers
