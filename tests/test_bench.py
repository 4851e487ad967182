"""``gpuserial.tools.bench``: the throughput table runs, tiny, on the CPU and the stand-in
device."""

import io
import json
import sys

import numpy
import pytest

from gpuserial.tools import bench
from tests.standin import StandInDevice


def _run(**kwargs) -> str:
    out = io.StringIO()
    assert bench.run(sizes=[4096], repeat=1, out=out, **kwargs) == 0
    return out.getvalue()


def test_the_table_has_transfer_and_save_load_rows(tmp_path):
    text = _run(targets=['cpu', StandInDevice(0)], directory=str(tmp_path))
    for name in ('memcpy (numpy.copyto)', 'engine d2h (host_chunks)', 'engine h2d (fill)',
                 'pinned single copy d2h (bus)', 'pageable d2h (cupy.asnumpy)', 'save_npz',
                 'load_npz', 'save_hdf5', 'load_hdf5'):
        assert name in text
    assert '@standin:0' in text and '@numpy' in text
    assert list(tmp_path.iterdir()) == []  # the temporary files are gone


def test_json_output():
    document = json.loads(_run(json=True))
    assert document['machine']['cpu']
    assert 'numpy' in document['machine']['versions']
    rows = document['rows']
    assert {r['name'] for r in rows} >= {'save_npz', 'load_npz', 'engine h2d (fill)'}
    assert all(r['nbytes'] == 4096 and r['seconds'] > 0 and r['gbps'] > 0 for r in rows)


def test_plot_without_matplotlib_is_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(ImportError, match=r'--plot needs matplotlib, which is not installed '
                                          r'\(pip install matplotlib\)'):
        bench.run(plot=str(tmp_path / 'plot.png'), sizes=[4096], repeat=1, out=io.StringIO())
    assert not (tmp_path / 'plot.png').exists()


@pytest.mark.parametrize(('name', 'error', 'message'), [
    ('plot.txt', ValueError, r"'plot.txt': --plot writes an image named for its format "
                             r"\(.*png.*\), not 'txt'$"),
    ('missing/plot.png', FileNotFoundError, r"'missing/plot.png': directory '.*missing' does "
                                            r"not exist$"),
])
def test_a_plot_path_that_cannot_be_written_fails_before_the_benchmark(
        tmp_path, monkeypatch, name, error, message):
    """matplotlib refused the format (or the directory was missing) only once every timing had
    run, in an error that did not name the file."""
    pytest.importorskip('matplotlib')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, 'transfer_rows', lambda *a: pytest.fail('the benchmark ran'))
    with pytest.raises(error, match=message):
        bench.run(plot=name, sizes=[4096], repeat=1, out=io.StringIO())


def test_plot_draws_an_image(tmp_path):
    pytest.importorskip('matplotlib')
    _run(plot=str(tmp_path / 'plot.png'))
    assert (tmp_path / 'plot.png').stat().st_size > 0


@pytest.mark.parametrize(('name', 'written'), [
    ('plot.png', 'plot.png'), ('plot', 'plot.png'), ('Plot.SVG', 'Plot.SVG'),
])
def test_plot_draws_an_image_named_in_the_working_directory(tmp_path, monkeypatch, name, written):
    """A bare name is a file in the working directory, and a name without a suffix gets
    matplotlib's default format (png); the check before the benchmark refuses neither."""
    pytest.importorskip('matplotlib')
    monkeypatch.chdir(tmp_path)
    _run(plot=name)
    assert [path.name for path in tmp_path.iterdir()] == [written]
    assert (tmp_path / written).stat().st_size > 0


@pytest.mark.parametrize('text, expected', [
    ('4096', 4096), ('16MiB', 16 << 20), ('1GiB', 1 << 30), ('1.5G', 3 << 29), ('2 kb', 2000),
])
def test_parse_size(text, expected):
    assert bench.parse_size(text) == expected


@pytest.mark.parametrize('text', ['', 'big', '1 parsec', '-1'])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError, match='not a size'):
        bench.parse_size(text)


@pytest.mark.parametrize('sizes, match', [([2], 'at least 4 bytes'), ([], 'at least 4 bytes')])
def test_run_refuses_bad_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        bench.run(sizes=sizes, out=io.StringIO())


@pytest.mark.parametrize('nbytes', [4, 4096, 1 << 20, 5 << 20])
def test_make_model_is_about_the_size_asked(nbytes):
    model = bench.make_model(nbytes)
    assert set(model) == {f'l{i}/{p}' for i in range(8) for p in 'Wb'}
    total = bench.model_nbytes(model)
    assert all(a.dtype == numpy.float32 for a in model.values())
    assert nbytes - 8 * 4 * 1024 <= total <= max(nbytes, 8 * 8)
    assert bench.make_array(nbytes).nbytes == max(nbytes // 4, 1) * 4
