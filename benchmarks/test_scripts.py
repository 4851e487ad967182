"""The standalone runners (compare.py, peak_memory.py) run, tiny, so that they cannot rot."""

import json

from benchmarks import compare, peak_memory


def test_compare_runs_interleaved_rounds(tmp_path, capsys):
    out = tmp_path / 'compare.json'
    assert compare.main(['--bytes', '64KiB', '--rounds', '2', '--warmup', '0', '--no-sync',
                         '--pairs', 'npz', 'hdf5', 'compressed', '--dir', str(tmp_path),
                         '--json', str(out)]) == 0
    document = json.loads(out.read_text())
    pairs = {r['pair']: r for r in document['results']}
    assert {'save_npz vs numpy.savez', 'load_npz vs raw readinto',
            'save_hdf5 vs h5py create_dataset',
            'save_npz(compression) vs numpy.savez_compressed'} <= set(pairs)
    for result in pairs.values():
        assert len(result['ratios']) == 2 and result['median_ratio'] > 0
        assert result['verdict'] in ('PASS', 'FAIL')
    assert 'size_ratio' in pairs['save_npz(compression) vs numpy.savez_compressed']
    assert 'median' in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ['compare.json']


def test_peak_memory_measures_in_fresh_processes(tmp_path, capsys):
    out = tmp_path / 'peak.json'
    assert peak_memory.main(['--bytes', '256KiB', '--cases', 'gpuserial.save_npz',
                             'gpuserial.load_npz', '--dir', str(tmp_path),
                             '--json', str(out)]) == 0
    results = json.loads(out.read_text())['results']
    assert [r['case'] for r in results] == ['gpuserial.save_npz', 'gpuserial.load_npz']
    for result in results:
        assert result['baseline_rss'] > 0 and result['extra'] >= 0
        assert result['verdict'] in ('PASS', 'FAIL')
