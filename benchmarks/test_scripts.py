"""The standalone runners (compare.py, peak_memory.py, small_entries.py, async_save.py,
sharded_save.py, remote.py) run, tiny, so that they cannot rot."""

import json
import math

import pytest

from benchmarks import async_save, compare, peak_memory, sharded_save, small_entries


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
        assert result['verdict'] in (('PASS', 'FAIL') if result['target'] is not None
                                     else ('info',))
    assert 'size_ratio' in pairs['save_npz(compression) vs numpy.savez_compressed']
    assert pairs['save_hdf5 gzip vs h5py create_dataset gzip']['verdict'] == 'info'
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


def test_small_entries_runs_every_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(small_entries, 'MODELS', {
        '10000x4KiB': lambda scale: small_entries.many_small(count=20, elements=16),
        'resnet50+adam': lambda scale: small_entries.resnet50(scale),
        'gpt2-small+adam': small_entries.gpt2_small})
    out = tmp_path / 'small.json'
    assert small_entries.main(['--rounds', '1', '--scale', '0.01', '--pairs', 'npz', 'hdf5',
                               '--json', str(out)]) == 0
    report = json.loads(out.read_text())
    models = report['models']
    assert models['10000x4KiB']['entries'] == 20
    # 53 convolutions with batch normalization (W, gamma, beta; avg_mean, avg_var, N) and the
    # classifier (W, b); Adam's m, v and t beside each parameter
    assert models['resnet50+adam']['entries'] == 4 * (53 * 3 + 2) + 53 * 3
    assert models['gpt2-small+adam']['entries'] == 4 * (2 + 12 * 12 + 2)
    for name, model in models.items():
        verdicts = {r['verdict'] for r in model['results']}
        assert verdicts <= ({'PASS', 'FAIL'} if name == '10000x4KiB' else {'info'}), name
        assert all(r['us_per_entry_ours'] > 0 for r in model['results'])
    assert 'us/entry' in capsys.readouterr().out


def test_async_save_reports_blocked_time_and_peak_memory(tmp_path, capsys):
    out = tmp_path / 'async.json'
    assert async_save.main(['--bytes', '1MiB', '--rounds', '2', '--compute-ms', '1',
                            '--peak-budget', '256KiB', '--json', str(out)]) == 0
    report = json.loads(out.read_text())
    for way in ('sync', 'async', 'copy', 'commit'):
        assert len(report['seconds'][way]) == 2 and report['medians'][way] > 0
    assert set(report['ratios']) >= {'async / sync', 'async / copy'}
    assert report['verdict'] in ('PASS', 'FAIL') and report['staging'] == 'host'
    assert report['peak']['budget'] == 256 << 10
    assert 'blocked time' in capsys.readouterr().out


@pytest.mark.mpi
def test_sharded_save_compares_the_three_ways(tmp_path, capsys):
    pytest.importorskip('mpi4py')  # and mpiexec beside it: test extras, not ci/test-oldest.sh's
    out = tmp_path / 'sharded.json'
    assert sharded_save.main(['--bytes', '256KiB', '--ranks', '1', '2', '--rounds', '1',
                              '--dir', str(tmp_path), '--json', str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report['ranks']) == {'1', '2'}
    for result in report['ranks'].values():
        assert set(result['medians']) == {'spread', 'rank0', 'copies'}
        assert result['ratios']['disk spread / one copy'] < 1.5  # headers, at 256 KiB
    assert report['ranks']['2']['ratios']['disk copies / one copy'] >= 2
    assert report['verdict'] in ('PASS', 'FAIL')
    assert 'spread / rank0' in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ['sharded.json']


def test_remote_compares_peers_on_moto(tmp_path, capsys):
    for extra in ('moto', 'torch', 'safetensors'):  # test extras, not ci/test-oldest.sh's
        pytest.importorskip(extra)
    from benchmarks import remote
    out = tmp_path / 'remote.json'
    assert remote.main(['--bytes', '1MiB', '--rounds', '1', '--peak', '--json', str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report['medians']) == {'gpuserial', 'torch.save + fs.open',
                                      'safetensors + fs.pipe'}
    assert report['requests']['copy_requests'] == 0
    assert 1 <= report['requests']['uploaded_ratio'] <= 1.02
    assert report['peak']['extra'] >= 0 and report['peak']['verdict'] in ('PASS', 'FAIL')
    assert 'gpuserial / torch.save' in capsys.readouterr().out


def test_remote_modelled_loads_include_a_sharded_checkpoint(tmp_path, capsys):
    from benchmarks import remote
    out = tmp_path / 'modelled.json'
    assert remote.main(['--modelled', '1', '1000', '--bytes', '1MiB', '--rounds', '1',
                        '--json', str(out)]) == 0
    report = json.loads(out.read_text())
    assert {'gpuserial', 'gpuserial, one GET at a time',
            'gpuserial load_sharded'} <= set(report['medians'])
    from gpuserial.tools import bench
    assert report['bytes'] == sum(value.nbytes for value in bench.make_model(1 << 20).values())
    assert report['model'] == 'uniform'
    assert 'gpuserial load_sharded' in capsys.readouterr().out


@pytest.mark.parametrize('name', ['resnet50+adam', 'gpt2-small+adam', '10000x4KiB'])
def test_remote_modelled_loads_take_every_real_model_at_full_size(name):
    from benchmarks import remote
    assert name in remote.REAL_MODELS
    shapes = remote.real_model_shapes(name)
    params = sum(math.prod(shape) for shape in shapes.values())
    assert len(shapes) >= 150 and params > 10_000_000
