"""The zip reader and writer against the standard library's zipfile: the same members, read
back the same way; and the records a broken directory gets refused by."""

import io
import os
import signal
import struct
import threading
import time
import zipfile
import zlib

import numpy
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpuserial import serializers
from gpuserial.engine import workers
from gpuserial.errors import CorruptFileError
from gpuserial.formats import _npy, _zipread, _zipstream
from tests import crafting

NAMES = st.one_of(st.from_regex(r'[a-z][a-z0-9_/.]{0,12}\.npy', fullmatch=True),
                  st.sampled_from(['é.npy', 'ключ/W.npy', '鍵.npy', 'a b.npy']))
MEMBERS = st.dictionaries(NAMES, st.binary(max_size=3000), min_size=0, max_size=12)
FIELDS = ('filename', 'header_offset', 'compress_size', 'file_size', 'CRC', 'compress_type',
          'flag_bits')


def _zipfile_members(data: bytes) -> list[tuple]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [tuple(getattr(info, field) for field in FIELDS) for info in archive.infolist()]


def _our_members(data: bytes) -> list[tuple]:
    return [tuple(getattr(m, field) for field in FIELDS)
            for m in _zipread.read_directory(io.BytesIO(data)).members]


def _ours(members: dict, compression: bool, seekable: bool) -> bytes:
    out = io.BytesIO() if seekable else crafting.Unseekable()
    with _zipstream.ZipWriter(out, compression=compression) as writer:
        for index, (name, data) in enumerate(members.items()):
            if index % 2:  # both ways of writing a member
                writer.write_small_member(name, data)
            else:
                writer.write_member(name, [data[:100], data[100:]])
    return out.getvalue() if seekable else bytes(out.data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=MEMBERS, compression=st.booleans(), seekable=st.booleans(),
       zip64_limit=st.sampled_from([0xFFFFFFFF, 100, 1000]),
       prefix=st.sampled_from([b'', b'#!/bin/sh\nexit 0\n']))
def test_the_directory_reads_as_zipfile_reads_it(members, compression, seekable, zip64_limit,
                                                 prefix):
    original = _zipstream.ZIP64_LIMIT
    _zipstream.ZIP64_LIMIT = zip64_limit
    try:
        data = prefix + _ours(members, compression, seekable)
    finally:
        _zipstream.ZIP64_LIMIT = original
    assert _our_members(data) == _zipfile_members(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert {name: archive.read(name) for name in archive.namelist()} == members


class _RecordedReads(io.BytesIO):
    """A file that records the byte ranges read from it."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.reads: list[tuple[int, int]] = []

    def read(self, count=-1, /) -> bytes:
        start = self.tell()
        data = super().read(count)
        self.reads.append((start, start + len(data)))
        return data


@pytest.mark.parametrize('count', [3, 3000], ids=['in the last 64 KiB', 'before them'])
@pytest.mark.parametrize('zip64_limit', [0xFFFFFFFF, 100], ids=['zip', 'zip64'])
@pytest.mark.parametrize('prefix', [b'', b'#!/bin/sh\nexit 0\n'], ids=['', 'prefixed'])
def test_the_directory_is_read_once_and_says_where_it_starts(monkeypatch, count, zip64_limit,
                                                             prefix):
    """The end records and the directory take what they can from the file's last 64 KiB,
    read first (a read of an object in a store is a GET): no byte is read twice."""
    monkeypatch.setattr(_zipstream, 'ZIP64_LIMIT', zip64_limit)
    members = {f'm{index:04d}.npy': bytes([index % 256]) * (index % 50) for index in range(count)}
    data = prefix + _ours(members, False, True)
    assert (b'PK\x06\x06' in data) == (zip64_limit == 100)
    fp = _RecordedReads(data)
    directory = _zipread.read_directory(fp)
    assert [member.filename for member in directory.members] == list(members)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert directory.start == archive.start_dir
    ordered = sorted(fp.reads)
    assert all(end <= start for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False))
    assert len(fp.reads) == (1 if len(data) - directory.start <= _zipread.END_SEARCH else 2)


def _zipfile_written(members: dict, compression: int, comment: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, 'w', compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.comment = comment
    return out.getvalue()


@settings(max_examples=40, deadline=None)
@given(members=MEMBERS, compression=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
       comment=st.one_of(st.binary(max_size=300),
                         st.builds(lambda a, b: a + b'PK\x05\x06' + b, st.binary(max_size=40),
                                   st.binary(max_size=40))))
@example(members={'a.npy': b'x'}, compression=zipfile.ZIP_STORED, comment=b'PK\x05\x06')
def test_zips_that_zipfile_writes_read_the_same(members, compression, comment):
    data = _zipfile_written(members, compression, comment)
    ours = _our_members(data)
    assert [member[0] for member in ours] == list(members)
    assert [member[3] for member in ours] == [len(value) for value in members.values()]
    if b'PK\x05\x06' not in comment:  # else zipfile may take the comment's for the end record
        assert ours == _zipfile_members(data)


@pytest.mark.parametrize('comment', [b'PK\x05\x06', b'PK\x05\x06' + bytes(18),
                                     b'PK\x05\x06' + bytes(18) + b'tail'])
def test_an_end_signature_in_the_comment_is_not_taken_for_the_end_record(comment):
    data = _zipfile_written({'a.npy': b'abc', 'b.npy': b''}, zipfile.ZIP_STORED, comment)
    members = _zipread.read_directory(io.BytesIO(data)).members
    assert [member.filename for member in members] == ['a.npy', 'b.npy']


@pytest.mark.parametrize('comment_length', [65500, 0xFFFF])
def test_a_zip64_directory_before_the_last_64_kib_reads_as_zipfile_reads_it(monkeypatch,
                                                                          comment_length):
    """A comment of nearly 64 KiB pushes the ZIP64 end record (across the last 64 KiB's start,
    or before it) and the directory (before it) out of the bytes read first: they are read
    from the file, nothing more."""
    monkeypatch.setattr(_zipstream, 'ZIP64_LIMIT', 100)
    members = {'a.npy': b'abc', 'b.npy': b'x' * 200}
    data = _ours(members, False, True)
    assert data[-22:-18] == b'PK\x05\x06' and data[-2:] == b'\0\0'  # no comment yet
    data = data[:-2] + comment_length.to_bytes(2, 'little') + b'c' * comment_length
    assert b'PK\x06\x06' in data[:len(data) - _zipread.END_SEARCH + 56]
    assert _our_members(data) == _zipfile_members(data)
    assert [member.filename for member in _zipread.read_directory(io.BytesIO(data)).members] \
        == list(members)


class _CutShortAfterItsTail(io.BytesIO):
    """A file that another process cuts short (rewriting it in place, as numpy.savez does)
    right after its last 64 KiB were read."""

    def __init__(self, data: bytes, cut: int):
        super().__init__(data)
        self.cut = cut
        self.reads = 0

    def read(self, count=-1, /) -> bytes:
        data = super().read(count)
        self.reads += 1
        if self.reads == 1:
            self.truncate(self.cut)
        return data


@pytest.mark.parametrize('into', [1, 50, 55, 1000], ids=['in a record', 'in a name',
                                                          'after a record', 'records later'])
def test_a_directory_cut_short_as_it_is_read_is_truncated(into):
    """It listed the members it still held (cut between two records) or a member named by
    the start of its name ('m000'), as if the zip held only those."""
    members = {f'm{index:04d}.npy': b'x' for index in range(3000)}  # a directory over 64 KiB
    data = _ours(members, False, True)
    start = _zipread.read_directory(io.BytesIO(data)).start
    assert start + 1000 < len(data) - _zipread.END_SEARCH  # the cut is before the tail
    with pytest.raises(_zipread.ZipError, match='^Truncated central directory$'):
        _zipread.read_directory(_CutShortAfterItsTail(data, start + into))


def test_bytes_appended_after_a_zip_do_not_hide_its_end_record():
    data = _zipfile_written({'a.npy': b'abc'}, zipfile.ZIP_STORED, b'') + b'appended'
    members = _zipread.read_directory(io.BytesIO(data)).members
    assert [member.filename for member in members] == ['a.npy']


def _ended(data: bytes, **fields) -> bytes:
    """``data`` with fields of its end record changed."""
    offset, values = crafting.end_record(data)
    names = ['signature', 'disk', 'directory_disk', 'count_here', 'count', 'size', 'start',
             'comment_length']
    values = [fields.get(name, value) for name, value in zip(names, values, strict=True)]
    out = bytearray(data)
    crafting.END.pack_into(out, offset, *values)
    return bytes(out)


def _cut_before_end(data: bytes, count: int) -> bytes:
    """``data`` with the last ``count`` bytes of its directory gone, its end record saying so."""
    offset, values = crafting.end_record(data)
    return _ended(data[:offset - count] + data[offset:], size=values[5] - count)


def _valid() -> bytes:
    return crafting.npz_of({'x': crafting.npy_of(numpy.arange(3.0))})


BROKEN = {
    'no end record': (lambda: b'PK\x03\x04' + bytes(100), 'truncated: it starts as a zip'),
    'a directory past the end': (lambda: _ended(_valid(), size=10 ** 6),
                                 'Truncated central directory'),
    'a directory on another disk': (lambda: _ended(_valid(), disk=1),
                                    'zipfiles that span multiple disks are not supported'),
    'a bad directory record': (
        lambda: _valid().replace(b'PK\x01\x02', b'PK\x01\x03'),
        'Bad magic number for central directory'),
    'a ZIP64 marker without its field': (
        lambda: crafting.patch_central(_valid(), 'x.npy', 'file_size', 0xFFFFFFFF),
        'a field says ZIP64, but there is no ZIP64 extra field'),
    'a last record cut short': (lambda: _cut_before_end(_valid(), 10),
                                'Truncated central directory'),
    'a directory cut short': (lambda: _ended(_valid(), size=crafting.end_record(_valid())[1][5]
                                             + 10, start=crafting.end_record(_valid())[1][6] - 10),
                              'Bad magic number for central directory|Truncated'),
}


@pytest.mark.parametrize('case', list(BROKEN))
def test_a_broken_directory_is_refused_naming_the_file(tmp_path, case):
    make, message = BROKEN[case]
    path = tmp_path / 'broken.npz'
    path.write_bytes(make())
    with pytest.raises(CorruptFileError, match=f"'{path}': not an NPZ \\(zip\\) file: "
                       f'({message})'):
        serializers.load_npz(path, {'x': None})


def test_names_without_the_utf8_flag_read_as_cp437_as_zipfile_reads_them():
    data = bytearray(crafting.zip_of({'é.npy': b'abc', 'plain.npy': b''}))
    for signature, flags_at in ((b'PK\x03\x04', 6), (b'PK\x01\x02', 8)):  # local, central
        at = data.find(signature)
        struct.pack_into('<H', data, at + flags_at,
                         struct.unpack_from('<H', data, at + flags_at)[0] & ~0x800)
    assert _our_members(bytes(data)) == _zipfile_members(bytes(data))
    assert _our_members(bytes(data))[0][0] == 'é'.encode().decode('cp437') + '.npy'


def test_members_with_comments_read_as_zipfile_reads_them():
    out = io.BytesIO()
    with zipfile.ZipFile(out, 'w') as archive:
        for name, comment in (('a.npy', b'a comment'), ('b.npy', b''), ('c.npy', b'x' * 300)):
            info = zipfile.ZipInfo(name)
            info.comment = comment
            archive.writestr(info, name.encode())
    assert _our_members(out.getvalue()) == _zipfile_members(out.getvalue())
    assert [m[0] for m in _our_members(out.getvalue())] == ['a.npy', 'b.npy', 'c.npy']


def test_zip64_fields_fill_only_the_fields_that_say_so():
    extra = struct.pack('<HH', 0x5455, 5) + b'12345' + struct.pack('<HHQQ', 1, 16, 7, 8)
    assert _zipread._extra_fields(extra, 0xFFFFFFFF, 5, 0xFFFFFFFF) == (7, 5, 8, None)
    assert _zipread._extra_fields(extra, 1, 0xFFFFFFFF, 3) == (1, 7, 3, None)
    with pytest.raises(_zipread.ZipError, match='too few ZIP64 values'):
        _zipread._extra_fields(struct.pack('<HHQ', 1, 8, 7), 0xFFFFFFFF, 0xFFFFFFFF, 3)
    with pytest.raises(_zipread.ZipError, match='Corrupt extra field'):
        _zipread._extra_fields(struct.pack('<HHQ', 1, 16, 7), 0xFFFFFFFF, 5, 6)
    with pytest.raises(_zipread.ZipError, match='no ZIP64 extra field'):
        _zipread._extra_fields(b'', 0xFFFFFFFF, 5, 6)
    with pytest.raises(_zipread.ZipError, match='Corrupt extra field'):  # as zipfile says
        _zipread._extra_fields(extra + struct.pack('<HH', 0x7875, 9), 0xFFFFFFFF, 5, 6)


# ---------------------------------------------------------------------------------------------
# The read-ahead window


@pytest.mark.parametrize('window', [16, 100, 4096])
def test_the_window_gives_the_files_bytes_for_every_read(window):
    data = bytes(range(256)) * 40
    windowed = _zipread.WindowedFile(io.BytesIO(data), window=window)
    rng = numpy.random.default_rng(window)
    for _ in range(300):
        position = int(rng.integers(0, len(data) + 10))
        count = int(rng.integers(0, 200))
        if rng.integers(0, 2):
            windowed.seek(position)
            assert windowed.read(count) == data[position:position + count]
            assert windowed.tell() == min(position + count, max(position, len(data)))
        elif rng.integers(0, 2):
            assert bytes(windowed.view(position, count)) == data[position:position + count]
        else:
            held, at = windowed.window_at(position, count)
            assert held[at:at + count] == data[position:position + count]
    fresh = _zipread.WindowedFile(io.BytesIO(data), window=window)
    first, at = fresh.window_at(7, 1)  # read from 7
    assert (first[at:at + 1], len(first)) == (data[7:8], window)
    last = 7 + window - 3  # the window's last three bytes
    assert fresh.window_at(last, 3) == (first, window - 3)
    held, at = fresh.window_at(last + 1, 3)  # past it: read again
    assert held[at:at + 3] == data[last + 1:last + 4]
    windowed.seek(10)
    buffer = bytearray(_zipread.DIRECT + 7)  # a large read goes straight to the file
    count = windowed.readinto(buffer)
    assert count == min(len(buffer), len(data) - 10)
    assert bytes(buffer[:count]) == data[10:10 + count]


class _FetchingAhead(io.BytesIO):
    """An object in a store, as the window sees it: every byte fetched ahead, and its reads
    recorded."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.reads: list[tuple[int, int]] = []

    def fetching_ahead(self, position: int) -> bool:
        return True

    def read(self, count=-1) -> bytes:
        self.reads.append((self.tell(), count))
        return super().read(count)


def test_where_the_store_fetches_ahead_the_window_reads_each_byte_once():
    """No read-ahead (the store fetches ahead), and a refill that starts within the window
    reads only what it lacks: going back would start the store's fetches afresh."""
    data = bytes(range(256)) * 8
    source = _FetchingAhead(data)
    windowed = _zipread.WindowedFile(source)
    held, at = windowed.window_at(100, 50)
    assert held[at:at + 50] == data[100:150]
    held, at = windowed.window_at(120, 80)  # from within the window, past its end
    assert held[at:at + 80] == data[120:200]
    assert bytes(windowed.view(300, 10)) == data[300:310]  # not in it: read from there
    assert source.reads == [(100, 50), (150, 50), (300, 10)]


def test_kept_bytes_read_as_the_file_holds_them_and_nothing_outside():
    kept = _zipread.KeptBytes(1000, bytes(range(100)))
    assert bytes(kept.view(1010, 5)) == bytes(range(10, 15)) and kept.tell() == 1010
    assert bytes(kept.view(1095, 10)) == bytes(range(95, 100))  # up to their end
    assert bytes(kept.view(999, 10)) == b''  # none before them
    kept.seek(1090)
    buffer = bytearray(20)
    assert kept.readinto(buffer) == 10 and bytes(buffer[:10]) == bytes(range(90, 100))
    assert kept.tell() == 1100 and kept.read(5) == b''
    with pytest.raises(io.UnsupportedOperation, match='seek to an offset only'):
        kept.seek(0, 2)  # they do not know where the file ends


# ---------------------------------------------------------------------------------------------
# The writer's records


def test_small_and_streamed_members_with_unicode_names(tmp_path):
    arrays = {'é': numpy.arange(3.0), 'ключ/W': numpy.ones((200, 300), numpy.float32),
              '鍵': numpy.float32(2.5), 'plain': numpy.zeros(5, numpy.int8)}
    for compression in (False, True):
        out = io.BytesIO()
        serializers.save_npz(out, arrays, compression=compression)
        members = crafting.check_zip_records(out.getvalue())
        assert [m['name'] for m in members] == [key + '.npy' for key in arrays]
        assert [bool(m['flags'] & 0x800) for m in members] == [True, True, True, False]
        with numpy.load(io.BytesIO(out.getvalue())) as npz:
            assert sorted(npz.files) == sorted(arrays)
            for key, value in arrays.items():
                numpy.testing.assert_array_equal(npz[key], value)


def test_members_carry_the_time_of_the_save(monkeypatch):
    moment = time.struct_time((2031, 7, 9, 13, 45, 58, 0, 190, 0))
    monkeypatch.setattr(_zipstream.time, 'localtime', lambda: moment)
    out = io.BytesIO()
    serializers.save_npz(out, {'a': numpy.zeros(3), 'b': numpy.zeros(50000)})
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as archive:
        assert {info.date_time for info in archive.infolist()} == {(2031, 7, 9, 13, 45, 58)}


def test_members_need_zip_version_45():
    out = io.BytesIO()
    serializers.save_npz(out, {'a': numpy.zeros(3), 'b': numpy.zeros(50000)})
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as archive:
        assert {(i.create_version, i.extract_version) for i in archive.infolist()} == {(45, 45)}


@pytest.mark.parametrize('fields', [1, 3000], ids=['short header', 'header over 64 KiB'])
def test_headers_are_padded_to_64_bytes_in_the_version_they_fit(fields):
    dtype = numpy.dtype([(f'field_{i}', '<f4') for i in range(fields)])
    header = _npy.encode_header(dtype, (2,))
    assert len(header) % 64 == 0 and header.endswith(b'\n')
    assert header[6:8] == (b'\x01\x00' if len(header) < 65536 else b'\x02\x00')
    member = io.BytesIO(header + bytes(2 * dtype.itemsize))
    read = numpy.lib.format.read_array(member, max_header_size=len(header))
    assert read.dtype == dtype and read.shape == (2,)


# ---------------------------------------------------------------------------------------------
# Edges of the records


def test_a_directory_whose_last_record_ends_the_directory_exactly():
    out = io.BytesIO()
    with _zipstream.ZipWriter(out, compression=False) as writer:
        writer.write_small_member('', b'no name')  # a central record of the fixed part only
    members = _zipread.read_directory(io.BytesIO(out.getvalue())).members
    assert [(m.filename, m.file_size) for m in members] == [('', 7)]


def test_a_size_at_the_zip64_marker_goes_into_zip64():
    """0xFFFFFFFF is the marker itself: a size or offset of that value must be in ZIP64."""
    writer = _zipstream.ZipWriter(io.BytesIO(), compression=False)
    for fields in ((0xFFFFFFFF, 1, 2), (1, 0xFFFFFFFF, 2), (1, 2, 0xFFFFFFFF)):
        record = writer._central_entry(b'a', 0, 0, *fields)
        values = crafting.CENTRAL_RECORD.unpack_from(record)
        extra = record[crafting.CENTRAL_RECORD.size + 1:]
        assert _zipstream.MARKER32 in values and struct.unpack('<HH', extra[:4]) == (1, 8)
        assert struct.unpack('<Q', extra[4:]) == (0xFFFFFFFF,)
    assert crafting.CENTRAL_RECORD.unpack_from(writer._central_entry(b'a', 0, 0, 1, 2, 3))[-1] == 3


def test_dates_before_1980_are_written_as_1980():
    _, date = _zipstream._dos_time(time.struct_time((1975, 6, 15, 12, 30, 10, 0, 0, -1)))
    assert (date >> 9, (date >> 5) & 0xF, date & 0x1F) == (0, 6, 15)


def test_a_save_flushes_a_buffered_file_object_it_was_handed():
    raw = io.BytesIO()
    buffered = io.BufferedWriter(raw, buffer_size=1 << 20)
    serializers.save_npz(buffered, {'a': numpy.arange(3.0)}, compression=False)
    with numpy.load(io.BytesIO(raw.getvalue())) as stored:  # before the caller flushes it
        assert stored['a'].tolist() == [0.0, 1.0, 2.0]


def _member(data: bytes, **changes) -> _zipread.Member:
    info = _zipread.read_directory(io.BytesIO(data)).members[0]
    return info._replace(**changes)


def test_the_member_reader_checks_the_member_itself():
    data = crafting.zip_of({'a.npy': b'0123456789'})
    for changes, message in (({'compress_type': 12}, 'unsupported compression method 12'),
                             ({'flag_bits': 1}, 'encrypted'),
                             ({'compress_size': 9}, 'stored member of 10 bytes takes 9')):
        with pytest.raises(_zipread.MemberError, match=message):
            _zipread.MemberReader(io.BytesIO(data), _member(data, **changes))


def test_finishing_a_member_read_in_part_is_an_error():
    data = crafting.zip_of({'a.npy': b'0123456789'})
    reader = _zipread.MemberReader(io.BytesIO(data), _member(data))
    assert reader.read(4) == b'0123'
    with pytest.raises(_zipread.MemberError, match='read 4 of 10 bytes'):
        reader.finish()


def test_a_local_header_cut_short_is_truncated():
    data = crafting.zip_of({'a.npy': b'0123456789'})
    member = _member(data)
    with pytest.raises(_zipread.MemberError, match='truncated: 9 of 30 header bytes'):
        _zipread.data_start_of(io.BytesIO(data[:9]), member)
    with pytest.raises(_zipread.MemberError, match='truncated: 2 of 5 header bytes'):
        _zipread.data_start_of(io.BytesIO(data[:32]), member)


def test_a_header_shorter_than_it_says_is_truncated():
    header = _npy.encode_header(numpy.dtype('<f4'), (3,))
    with pytest.raises(_npy.HeaderError, match=f'truncated .npy header: {len(header) - 1} of '):
        _npy.decode_header(header[:-1])


def test_a_member_that_needs_a_newer_reader_than_zip_6_3_is_refused():
    data = bytearray(crafting.zip_of({'a.npy': b'0123456789'}))
    record = crafting.central_records(bytes(data))['a.npy']
    for needed, readable in ((63, True), (64, False)):
        struct.pack_into('<H', data, record + 6, needed)  # version needed to extract
        if readable:
            assert len(_zipread.read_directory(io.BytesIO(bytes(data))).members) == 1
        else:
            with pytest.raises(_zipread.ZipError, match='zip file version 6.4'):
                _zipread.read_directory(io.BytesIO(bytes(data)))


# ---------------------------------------------------------------------------------------------
# Found alive by mutation testing


def _written(members: dict, out=None, compression: bool = False) -> bytes:
    out = io.BytesIO() if out is None else out
    with _zipstream.ZipWriter(out, compression=compression) as writer:
        for name, data in members.items():
            writer.write_member(name, [data])
    return out.getvalue()


@pytest.mark.parametrize('compression', [False, True])
def test_members_are_unix_files_of_mode_644_with_the_fields_zipfile_writes(compression):
    out = io.BytesIO()
    with _zipstream.ZipWriter(out, compression=compression) as writer:
        writer.write_member('streamed.npy', [bytes(100_000)])
        writer.write_small_member('small.npy', b'head', b'x')
        writer.write_small_members([('sm\u00e5ll.npy', b'', memoryview(b'yz'))])
    moment = time.localtime()
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as z:
        infos = z.infolist()
        assert [i.filename for i in infos] == ['streamed.npy', 'small.npy', 'sm\u00e5ll.npy']
        for info in infos:
            assert info.create_system == 3 and info.external_attr == 0o100644 << 16
            assert info.create_version == info.extract_version == 45
            assert info.compress_type == (zipfile.ZIP_DEFLATED if compression
                                          else zipfile.ZIP_STORED)
            assert info.date_time[:3] == moment[:3]  # the day the writer was made
            assert not info.extra and not info.comment and info.internal_attr == info.volume == 0
        assert [i.flag_bits & 0x800 for i in infos[1:]] == [0, 0x800]  # UTF-8 names say so
        assert z.read('small.npy') == b'headx' and z.read('sm\u00e5ll.npy') == b'yz'
        assert z.testzip() is None


def test_small_members_are_written_as_they_come_a_piece_at_a_time():
    out = crafting.Unseekable()
    writes = []
    write = out.write
    out.write = lambda data: writes.append(len(data)) or write(data)
    member = _zipstream.WRITE_PIECE // 4  # with its local header: four make a piece exactly
    writer = _zipstream.ZipWriter(out, compression=False)
    writer.write_small_members(
        (name, b'', memoryview(bytes(member - _zipstream.LOCAL.size - len(name))))
        for name in 'abcdefghi')
    assert writes == [_zipstream.WRITE_PIECE] * 2  # the ninth is still pending
    writer.close()
    assert sum(writes) == len(out.data)
    with zipfile.ZipFile(io.BytesIO(bytes(out.data))) as z:
        assert z.namelist() == list('abcdefghi') and z.testzip() is None


def test_a_small_member_at_the_zip64_limit_gets_its_offset_in_a_zip64_field(monkeypatch):
    monkeypatch.setattr(_zipstream, 'ZIP64_LIMIT', _zipstream.LOCAL.size + 2)  # where b starts
    out = io.BytesIO()
    with _zipstream.ZipWriter(out, compression=False) as writer:
        writer.write_small_members([('a', b'', memoryview(b'x')), ('b', b'', memoryview(b''))])
    data = out.getvalue()
    records = {'a': data.index(b'PK\x01\x02'), 'b': data.rindex(b'PK\x01\x02')}
    extra_length = struct.unpack_from('<H', data, records['b'] + 30)[0]
    assert struct.unpack_from('<H', data, records['a'] + 30)[0] == 0 and extra_length == 12
    assert struct.unpack_from('<HHQ', data, records['b'] + 46 + 1) == (
        1, 8, _zipstream.LOCAL.size + 2)
    assert struct.unpack_from('<I', data, records['b'] + 42)[0] == _zipstream.MARKER32


def test_a_loop_of_small_members_stopped_by_an_error_keeps_where_they_end():
    members = [(f'm{i}.npy', b'head', memoryview(bytes(100_000))) for i in range(15)]

    def failing_after(count):
        yield from members[:count]
        raise RuntimeError('the next member could not be made')

    whole = _zipstream.ZipWriter(io.BytesIO(), compression=False)
    whole.write_small_members(members)  # past a write piece: the loop flushes on the way
    stopped = _zipstream.ZipWriter(io.BytesIO(), compression=False)
    with pytest.raises(RuntimeError):
        stopped.write_small_members(failing_after(14))
    partial = _zipstream.ZipWriter(io.BytesIO(), compression=False)
    partial.write_small_members(members[:14])
    assert stopped.position == partial.position < whole.position
    assert stopped.data_starts == partial.data_starts


@pytest.mark.parametrize('count, zip64', [(0xFFFE, False), (0xFFFF, True)])
def test_as_many_members_as_the_16_bit_count_holds_get_zip64_end_records(count, zip64):
    out = io.BytesIO()
    with _zipstream.ZipWriter(out, compression=False) as writer:
        writer.write_small_members((f'{i}', b'', memoryview(b'')) for i in range(count))
    data = out.getvalue()
    assert (b'PK\x06\x06' in data) == zip64
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert len(z.infolist()) == count


def test_a_directory_as_large_as_the_zip64_limit_gets_zip64_end_records(monkeypatch):
    names = [f'member{i}.npy' for i in range(3)]

    def written() -> bytes:  # small members: their data lies before the limit
        out = io.BytesIO()
        with _zipstream.ZipWriter(out, compression=False) as writer:
            for name in names:
                writer.write_small_member(name, b'', b'x')
        return out.getvalue()

    plain = written()
    directory_size, start = crafting.end_record(plain)[1][5:7]
    assert b'PK\x06\x06' not in plain and start < directory_size
    monkeypatch.setattr(_zipstream, 'ZIP64_LIMIT', directory_size + 1)
    assert b'PK\x06\x06' not in written()
    monkeypatch.setattr(_zipstream, 'ZIP64_LIMIT', directory_size)
    data = written()
    members = names
    assert b'PK\x06\x06' in data
    assert [m.filename for m in _zipread.read_directory(io.BytesIO(data)).members] == list(members)


def test_a_file_object_at_its_start_is_seekable_and_gets_no_data_descriptors():
    data = _written({'big.npy': bytes(200_000)})  # streamed: sizes patched in, no descriptor
    (info,) = zipfile.ZipFile(io.BytesIO(data)).infolist()
    assert not info.flag_bits & 0x08 and b'PK\x07\x08' not in data


def test_a_zip64_end_record_on_another_disk_is_refused(monkeypatch):
    monkeypatch.setattr(_zipstream, 'ZIP64_LIMIT', 1)
    data = bytearray(_written({'a.npy': b'abc'}))
    at = data.rindex(b'PK\x06\x06')
    struct.pack_into('<I', data, at + 16, 1)  # this disk: 1; the directory's disk stays 0
    with pytest.raises(_zipread.ZipError, match='span multiple disks'):
        _zipread.read_directory(io.BytesIO(bytes(data)))


def test_a_large_stored_member_cut_short_is_truncated():
    data = _written({'big.npy': bytes(range(256)) * 1000})
    (member,) = _zipread.read_directory(io.BytesIO(data)).members
    start = _zipread.data_start_of(io.BytesIO(data), member)
    cut = _zipread.WindowedFile(io.BytesIO(data[:start + 100_000]))
    with pytest.raises(_zipread.MemberError, match='truncated'):
        _zipread.read_stored(cut, member, start, 0, bytearray(member.file_size))


def test_a_deflated_member_reads_in_parts_larger_than_a_piece():
    payload = numpy.random.default_rng(0).integers(0, 256, 600_000, dtype=numpy.uint8).tobytes()
    data = _written({'r.npy': payload}, compression=True)
    (member,) = _zipread.read_directory(io.BytesIO(data)).members
    reader = _zipread.MemberReader(io.BytesIO(data), member)
    out = bytearray(len(payload))
    view = memoryview(out)
    for start in range(0, len(payload), 300_000):  # each more than PIECE, ending mid-stream
        assert reader.readinto(view[start:start + 300_000]) == min(300_000,
                                                                  len(payload) - start)
    reader.finish()
    assert bytes(out) == payload


@pytest.mark.parametrize('size', [4096, 200_000])  # from the window, and straight from the file
def test_read_stored_fills_any_contiguous_buffer_with_the_members_bytes(size):
    payload = numpy.random.default_rng(1).integers(0, 256, size, dtype=numpy.uint8).tobytes()
    data = _written({'a.npy': payload})
    (member,) = _zipread.read_directory(io.BytesIO(data)).members
    start = _zipread.data_start_of(io.BytesIO(data), member)
    head = 16
    for out in (numpy.zeros((size - head) // 4, numpy.float32),  # read as float32, 4 bytes each
                numpy.zeros((2, (size - head) // 2), numpy.uint8)):  # two rows of bytes
        _zipread.read_stored(_zipread.WindowedFile(io.BytesIO(data)), member, start, head,
                             memoryview(out))
        assert out.tobytes() == payload[head:]


def test_read_stored_refuses_a_buffer_with_gaps():
    data = _written({'a.npy': bytes(range(200))})
    (member,) = _zipread.read_directory(io.BytesIO(data)).members
    start = _zipread.data_start_of(io.BytesIO(data), member)
    every_other = memoryview(bytearray(400))[::2]  # 200 bytes, one in two
    with pytest.raises(TypeError, match='C-contiguous'):
        _zipread.read_stored(_zipread.WindowedFile(io.BytesIO(data)), member, start, 0,
                             every_other)


class _ReadsBytearrays(io.RawIOBase):
    """A file whose reads return a bytearray, not bytes, as a user's file-like object may."""

    def __init__(self, data: bytes):
        self.inner = io.BytesIO(data)

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self.inner.seek(offset, whence)

    def tell(self):
        return self.inner.tell()

    def read(self, count=-1):
        return bytearray(self.inner.read(count))

    def readinto(self, buffer):
        return self.inner.readinto(buffer)


def test_an_npz_loads_from_a_file_whose_reads_return_bytearrays():
    saved = {f'p{i}/W': numpy.arange(i, i + 300, dtype=numpy.float32) for i in range(5)}
    out = io.BytesIO()
    serializers.save_npz(out, saved, compression=False)  # stored: read from the window
    loaded = {key: numpy.zeros_like(value) for key, value in saved.items()}
    serializers.load_npz(_ReadsBytearrays(out.getvalue()), loaded)
    for key, value in saved.items():
        numpy.testing.assert_array_equal(loaded[key], value)


# Small deflated members: read whole (read_deflated) and streamed (MemberReader) alike

_PAYLOAD = numpy.random.default_rng(2).standard_normal(1000).astype(numpy.float32).tobytes()


def _deflated(stream_tail: bytes = b'', **changes) -> tuple[_zipread.WindowedFile,
                                                              _zipread.Member]:
    """A deflated member whose data starts at offset 0 of its file: ``_PAYLOAD``'s stream,
    then ``stream_tail``; ``changes`` to its directory fields."""
    deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw = deflater.compress(_PAYLOAD) + deflater.flush() + stream_tail
    member = _zipread.Member('a.npy', 0, len(raw), len(_PAYLOAD), zlib.crc32(_PAYLOAD),
                             _zipstream.DEFLATED, 0, b'a.npy')._replace(**changes)
    return _zipread.WindowedFile(io.BytesIO(raw)), member


def _read_streamed(fp, member) -> bytes:
    reader = _zipread.MemberReader(fp, member, 0)
    out = reader.read(member.file_size)
    reader.finish()
    return out


def test_a_small_deflated_member_reads_whole_as_streamed():
    fp, member = _deflated()
    out = bytearray(len(_PAYLOAD) - 16)
    _zipread.read_deflated(fp, member, 0, 16, out)
    assert bytes(out) == _PAYLOAD[16:] == _read_streamed(fp, member)[16:]
    assert _zipread.inflated_head(fp, member, 0, 10) == _PAYLOAD[:10]
    assert _zipread.inflated_head(fp, member, 0, 3000) == _PAYLOAD[:3000]  # several reads
    assert _zipread.inflated_head(fp, member, 0, 10 ** 6) == _PAYLOAD  # the member is shorter
    with pytest.raises(_zipread.MemberError, match='asked for 4001 bytes of a member of 4000'):
        _zipread.read_deflated(fp, member, 0, 1, bytearray(len(_PAYLOAD)))


def test_the_head_of_a_deflated_member_reads_no_byte_past_its_stored_bytes():
    fp, member = _deflated()
    short = member._replace(compress_size=100)  # the stream goes on past what it says it holds
    head = _zipread.inflated_head(fp, short, 0, 3000)
    assert 0 < len(head) < 3000 and head == _PAYLOAD[:len(head)]
    cut = _zipread.WindowedFile(io.BytesIO(fp.view(0, 100).tobytes()))  # the file ends there
    with pytest.raises(_zipread.MemberError, match=f'truncated: the file ends '
                                                   f'{member.compress_size - 100} bytes early'):
        _zipread.inflated_head(cut, member, 0, 3000)


BROKEN_DEFLATED = {
    'CRC': ({'CRC': zlib.crc32(b'other')}, b'', 'CRC mismatch'),
    'one byte more claimed': ({'file_size': len(_PAYLOAD) + 1}, b'', 'ends 1 bytes early'),
    'one byte less claimed': ({'file_size': len(_PAYLOAD) - 1}, b'', 'holds more than'),
    'bytes after the stream': ({}, b'junk', 'holds 4 bytes after the end of its deflate'),
    'a second stream after it': ({}, zlib.compress(b'x')[2:-4], 'after the end of its'),
}


@pytest.mark.parametrize('case', list(BROKEN_DEFLATED))
def test_a_broken_small_deflated_member_fails_whole_as_streamed_and_fills_nothing(case):
    changes, tail, message = BROKEN_DEFLATED[case]
    fp, member = _deflated(tail)
    member = member._replace(**changes)
    out = bytearray(member.file_size)
    with pytest.raises(_zipread.MemberError, match=message):
        _zipread.read_deflated(fp, member, 0, 0, out)
    assert out == bytearray(member.file_size)  # checked before it changes
    with pytest.raises(_zipread.MemberError):
        _read_streamed(fp, member)


def test_a_corrupt_or_cut_deflate_stream_is_a_member_error_in_every_reader():
    fp, member = _deflated()
    whole = bytes(fp.view(0, member.compress_size))
    corrupt = _zipread.WindowedFile(io.BytesIO(b'\xff' + whole[1:]))  # block type 3: none such
    cut = _zipread.WindowedFile(io.BytesIO(whole[:member.compress_size // 2]))
    for source, message in ((corrupt, 'corrupt deflate data'), (cut, 'truncated')):
        with pytest.raises(_zipread.MemberError, match=message):
            _zipread.read_deflated(source, member, 0, 0, bytearray(member.file_size))
        with pytest.raises(_zipread.MemberError):
            _read_streamed(source, member)
    with pytest.raises(_zipread.MemberError, match='corrupt deflate data'):
        _zipread.inflated_head(corrupt, member, 0, 10)
    assert len(_zipread.inflated_head(cut, member, 0, 10)) == 10  # the start is whole


# ---------------------------------------------------------------------------------------------
# Deflated members in blocks: deflated and inflated on threads, one stream that any reader reads

BLOCK = _zipstream.BLOCK
SIZES = [BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12345]


def _threads(monkeypatch, count: int) -> None:
    monkeypatch.setattr(workers, 'count', lambda: count)


def _payload(size: int) -> bytes:
    """Half noise, half runs: blocks that deflate to different sizes."""
    noise = numpy.random.default_rng(size).integers(0, 256, size // 2, numpy.uint8).tobytes()
    return noise + (b'run' * size)[:size - len(noise)]


def _in_blocks(chunk: int, monkeypatch) -> bytes:
    monkeypatch.setattr(time, 'localtime', lambda: time.struct_time((2026, 12, 7, 12, 0, 0, 0,
                                                                     341, 0)))
    out = io.BytesIO()
    with _zipstream.ZipWriter(out, compression=True) as writer:
        for size in SIZES:
            data = memoryview(_payload(size))
            writer.write_member(f'{size}.npy', [data[start:start + chunk]
                                                for start in range(0, size, chunk)])
    return out.getvalue()


@pytest.mark.parametrize('threads', [1, 3])
def test_deflated_blocks_are_the_same_bytes_whatever_the_threads_and_chunks(monkeypatch,
                                                                           threads):
    _threads(monkeypatch, 1)
    expected = _in_blocks(BLOCK * 4, monkeypatch)
    _threads(monkeypatch, threads)
    for chunk in (7777, BLOCK, BLOCK + 3, 3 * BLOCK):
        assert _in_blocks(chunk, monkeypatch) == expected, chunk
    with zipfile.ZipFile(io.BytesIO(expected)) as archive:  # one deflate stream each
        for size in SIZES:
            assert archive.read(f'{size}.npy') == _payload(size)
    for member in _zipread.read_directory(io.BytesIO(expected)).members:
        size = member.file_size
        if size < BLOCK:
            assert member.blocks is None
        else:
            assert member.blocks is not None
            assert (member.blocks.size, len(member.blocks.deflated)) == (BLOCK, size // BLOCK)


def _read_all(data: bytes, name: str) -> bytes:
    fp = _zipread.WindowedFile(io.BytesIO(data))
    member = next(m for m in _zipread.read_directory(fp).members if m.filename == name)
    reader = _zipread.MemberReader(fp, member, whole=True)
    out = bytearray(member.file_size)
    view = memoryview(out)
    for start in range(0, len(out), 300_000):  # reads across the blocks' ends
        reader.readinto(view[start:start + 300_000])
    reader.finish()
    return bytes(out)


@pytest.mark.parametrize('threads', [1, 3])
def test_blocks_inflate_on_the_pools_threads_or_as_one_stream_alike(monkeypatch, threads):
    _threads(monkeypatch, 3)
    data = _in_blocks(BLOCK, monkeypatch)
    _threads(monkeypatch, threads)
    where: list[str] = []
    inflate = _zipread._inflate_block
    monkeypatch.setattr(_zipread, '_inflate_block', lambda *args: where.append(
        threading.current_thread().name) or inflate(*args))
    for size in SIZES:
        assert _read_all(data, f'{size}.npy') == _payload(size)
    if threads == 1:
        assert where == []
    else:  # every block and the stream's end, on the pool's threads
        assert len(where) == sum(size // BLOCK + 1 for size in SIZES if size >= BLOCK)
        assert all(name.startswith('gpuserial-worker') for name in where)


def test_blocks_written_to_a_stream_that_cannot_seek_read_back_alike(monkeypatch):
    """Sizes and CRC in a data descriptor after the blocks; the block list in the directory."""
    _threads(monkeypatch, 3)
    out = crafting.Unseekable()
    size = SIZES[-1]
    with _zipstream.ZipWriter(out, compression=True) as writer:
        writer.write_member('a.npy', [_payload(size)])
    data = bytes(out.data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.getinfo('a.npy').flag_bits & _zipstream.DESCRIPTOR_FLAG
        assert archive.read('a.npy') == _payload(size)
    assert _zipread.read_directory(io.BytesIO(data)).members[0].blocks is not None
    assert _read_all(data, 'a.npy') == _payload(size)


@pytest.mark.parametrize('zip64_limit, zip64_bytes', [(0xFFFFFFFF, 0), (100, 20)])
def test_a_block_list_goes_into_the_directory_only_where_the_extra_field_holds_it(
        monkeypatch, zip64_limit, zip64_bytes):
    """An extra field holds 64 KiB at most (a member of some 16 GiB has more blocks): past
    that, the member is written and read as one stream, with no list."""
    _threads(monkeypatch, 3)
    monkeypatch.setattr(_zipstream, 'ZIP64_LIMIT', zip64_limit)  # sizes in a ZIP64 field
    data = _payload(5 * BLOCK + 7)
    needed = zip64_bytes + 8 + 4 * 5  # the ZIP64 field, the list's header and block size, 5
    for room, listed in ((needed, True), (needed - 1, False)):
        monkeypatch.setattr(_zipstream, 'MAX_EXTRA', room)
        out = io.BytesIO()
        with _zipstream.ZipWriter(out, compression=True) as writer:
            writer.write_member('a.npy', [data])
        member = _zipread.read_directory(io.BytesIO(out.getvalue())).members[0]
        assert (member.blocks is not None) == listed
        with zipfile.ZipFile(io.BytesIO(out.getvalue())) as archive:
            assert len(archive.getinfo('a.npy').extra) == (needed if listed else zip64_bytes)
            assert archive.read('a.npy') == data
        assert _read_all(out.getvalue(), 'a.npy') == data


def test_at_most_one_block_more_than_the_threads_is_inflated_ahead_of_the_reader(monkeypatch):
    _threads(monkeypatch, 3)
    data = _in_blocks(BLOCK, monkeypatch)
    _threads(monkeypatch, 2)
    name = f'{SIZES[-1]}.npy'
    fp = _zipread.WindowedFile(io.BytesIO(data))
    member = next(m for m in _zipread.read_directory(fp).members if m.filename == name)
    reader = _zipread.MemberReader(fp, member, whole=True)
    fetched, ahead = [], []
    raw = reader.blocks.raw
    reader.blocks.raw = lambda count: fetched.append(count) or raw(count)
    out = memoryview(bytearray(member.file_size))
    for start in range(0, len(out), 64 << 10):
        reader.readinto(out[start:start + (64 << 10)])
        ahead.append(len(fetched) - reader.produced // BLOCK)
    reader.finish()
    assert bytes(out) == _payload(SIZES[-1])
    assert max(ahead) == 3  # the block being read and two more: the threads


def test_a_stream_that_does_not_end_after_its_last_whole_block_is_refused(monkeypatch):
    """A member of exactly two blocks: its stream's end is the last segment, which holds no
    data; it is read and checked all the same, as the stream is when read as one."""
    _threads(monkeypatch, 3)
    payload = _payload(2 * BLOCK)
    out = io.BytesIO()
    with _zipstream.ZipWriter(out, compression=True) as writer:
        writer.write_member('a.npy', [payload])
    data = out.getvalue()
    member = _zipread.read_directory(io.BytesIO(data)).members[0]
    end = _zipread.data_start_of(io.BytesIO(data), member) + member.compress_size
    assert data[end - 2:end] == b'\x03\x00'  # an empty final block: the stream's end
    assert _read_all(data, 'a.npy') == payload
    broken = data[:end - 2] + b'\x00\x00' + data[end:]  # a stored block, cut short
    with pytest.raises(_zipread.MemberError, match='deflate stream does not end|truncated'):
        _read_all(broken, 'a.npy')
    _threads(monkeypatch, 1)  # as one stream: the same
    with pytest.raises(_zipread.MemberError, match='the deflate stream'):
        _read_all(broken, 'a.npy')


def _with_block_list(data: bytes, name: str, change) -> bytes:
    """``data`` with the block list of member ``name`` changed by ``change`` (a function of
    the list's sizes that returns new ones, as many)."""
    member = next(m for m in _zipread.read_directory(io.BytesIO(data)).members
                  if m.filename == name)
    old = struct.pack(f'<I{len(member.blocks.deflated)}I', BLOCK, *member.blocks.deflated)
    new = struct.pack(f'<I{len(member.blocks.deflated)}I', BLOCK,
                      *change(list(member.blocks.deflated)))
    assert data.count(old) == 1
    return data.replace(old, new)


def test_a_block_list_that_lies_is_an_error_and_one_that_does_not_fit_is_ignored(monkeypatch):
    _threads(monkeypatch, 3)
    data = _in_blocks(BLOCK, monkeypatch)
    name = f'{SIZES[-1]}.npy'
    shifted = _with_block_list(data, name, lambda sizes: [sizes[0] + 1, sizes[1] - 1,
                                                          *sizes[2:]])
    with pytest.raises(_zipread.MemberError, match='corrupt deflate data|does not break where'):
        _read_all(shifted, name)
    with zipfile.ZipFile(io.BytesIO(shifted)) as archive:  # the stream itself is whole
        assert archive.read(name) == _payload(SIZES[-1])
    for unfit in (lambda sizes: [0, *sizes[1:]],  # no block is that short
                  lambda sizes: [1 << 30, *sizes[1:]]):  # longer than the member
        assert _read_all(_with_block_list(data, name, unfit), name) == _payload(SIZES[-1])


def test_a_block_cut_or_corrupt_fails_the_read(monkeypatch):
    _threads(monkeypatch, 3)
    data = _in_blocks(BLOCK, monkeypatch)
    name = f'{SIZES[-1]}.npy'
    member = next(m for m in _zipread.read_directory(io.BytesIO(data)).members
                  if m.filename == name)
    start = _zipread.data_start_of(io.BytesIO(data), member)
    second = start + member.blocks.deflated[0]
    corrupt = data[:second] + b'\xff' + data[second + 1:]  # block type 3: none such
    with pytest.raises(_zipread.MemberError, match='corrupt deflate data'):
        _read_all(corrupt, name)
    flipped = bytearray(data)
    flipped[second + 1000] ^= 0x10
    with pytest.raises(_zipread.MemberError):  # whatever it inflates to, the CRC disagrees
        _read_all(bytes(flipped), name)


def test_at_most_one_block_more_than_the_threads_is_deflated_ahead_of_the_file(monkeypatch):
    """Memory stays bound: a block is handed to the threads only once all but ``count`` of
    those before it are in the file, within a chunk too."""
    _threads(monkeypatch, 2)
    submitted, written, ahead = [], [], []
    deflate = _zipstream._deflate

    def counted(block):
        submitted.append(1)
        ahead.append(len(submitted) - len(written))
        return deflate(block)

    monkeypatch.setattr(_zipstream, '_deflate', counted)

    class Counting(io.BytesIO):
        def write(self, data):
            if self.tell():  # a block, not the local header (written first)
                written.append(len(data))
            return super().write(data)

    data = _payload(8 * BLOCK)
    with _zipstream.ZipWriter(Counting(), compression=True) as writer:
        writer.write_member('a.npy', [data])  # one chunk of eight blocks
    assert len(submitted) == 8 and max(ahead) == 3


@pytest.mark.parametrize('threads', [1, 3])
def test_a_failed_deflated_write_leaves_no_thread_reading_its_chunks(monkeypatch, threads):
    _threads(monkeypatch, threads)
    running = []
    deflate = _zipstream._deflated

    def slow(block, last):
        running.append(1)
        time.sleep(0.05)
        result = deflate(block, last)
        running.pop()
        return result

    monkeypatch.setattr(_zipstream, '_deflated', slow)

    class Failing(io.BytesIO):
        def write(self, data):
            if self.tell() > 1000:  # past the local header: the first block fails
                raise OSError(28, 'No space left on device')
            return super().write(data)

    with pytest.raises(OSError, match='No space left'):
        with _zipstream.ZipWriter(Failing(), compression=True) as writer:
            writer.write_member('a.npy', [bytes(8 * BLOCK)])
    assert running == []


def test_a_forked_child_deflates_with_its_own_threads(tmp_path):
    serializers.save_npz(tmp_path / 'parent.npz', {'w': numpy.ones(BLOCK)})  # the pool started
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        signal.alarm(60)  # a child waiting on its parent's threads would hang
        try:
            serializers.save_npz(tmp_path / 'child.npz', {'w': numpy.arange(BLOCK)})
            target = {'w': numpy.zeros(BLOCK, numpy.int64)}
            serializers.load_npz(tmp_path / 'child.npz', target)
            os._exit(0 if (target['w'] == numpy.arange(BLOCK)).all() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _deflate_as(data: bytes, flush: int, tail: bytes = b'') -> bytes:
    deflater = zlib.compressobj(1, zlib.DEFLATED, -15)
    return deflater.compress(data) + deflater.flush(flush) + tail


BLOCK_DATA = bytes(range(256)) * 64  # 16 KiB
BROKEN_BLOCKS = {  # (deflated bytes, the size the list gives, last) -> the message
    'a whole block holding more': ((_deflate_as(BLOCK_DATA * 2, zlib.Z_SYNC_FLUSH),
                                    len(BLOCK_DATA), False), 'holds more than the directory'),
    'the last block holding more': ((_deflate_as(BLOCK_DATA * 2, zlib.Z_FINISH),
                                     len(BLOCK_DATA), True), 'holds more than the directory'),
    'the last block short': ((_deflate_as(BLOCK_DATA[:-10], zlib.Z_FINISH), len(BLOCK_DATA),
                              True), 'the deflate stream ends 10 bytes early'),
    'the last block not ending the stream': ((_deflate_as(BLOCK_DATA, zlib.Z_SYNC_FLUSH),
                                              len(BLOCK_DATA), True),
                                             'the deflate stream does not end'),
    'bytes after the stream': ((_deflate_as(BLOCK_DATA, zlib.Z_FINISH, b'junk'),
                                len(BLOCK_DATA), True), '4 bytes after the end of its deflate'),
    'a whole block ending the stream': ((_deflate_as(BLOCK_DATA, zlib.Z_FINISH),
                                         len(BLOCK_DATA), False), 'does not break where'),
    'a whole block short': ((_deflate_as(BLOCK_DATA[:-1], zlib.Z_SYNC_FLUSH), len(BLOCK_DATA),
                             False), 'does not break where'),
    'a whole block with no sync flush': ((_deflate_as(BLOCK_DATA, zlib.Z_PARTIAL_FLUSH),
                                          len(BLOCK_DATA), False), 'does not break where'),
}


@pytest.mark.parametrize('case', list(BROKEN_BLOCKS))
def test_each_block_is_checked_as_it_is_inflated(case):
    (data, size, last), message = BROKEN_BLOCKS[case]
    with pytest.raises(_zipread.MemberError, match=message):
        _zipread._inflate_block(data, size, last)
    whole = _deflate_as(BLOCK_DATA, zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    assert _zipread._inflate_block(whole, len(BLOCK_DATA), last) == BLOCK_DATA
