//! The on-disk record batch ("frame"), Kafka-style: one header, one CRC, many records.
//!
//! ```text
//! offset size  field
//!   0     4    body_len        u32 LE, bytes after the header
//!   4     4    crc32           IEEE CRC-32 of bytes 8..32+body_len
//!   8     8    base_sequence   u64 LE, sequence of the first record
//!  16     4    record_count    u32 LE
//!  20     8    appended_at_ms  i64 LE
//!  28     1    codec           0 = none, 1 = zstd, 2 = lz4 (block, its size first)
//!  29     3    reserved        zero
//!  32     …    body            records: key_len u16 | payload_len u32 | key | payload
//! ```
//!
//! A frame is written whole, and made durable (fsynced in the journal, which open replays
//! into the segment) before any of its records is acknowledged, so a
//! crash can only leave torn frames past the shard's durable watermark, which recovery
//! detects by length, CRC or sequence and truncates. A bad frame below the watermark is
//! damage to acknowledged records: recovery refuses it and readers fail on it, naming the
//! file and offset (see `segment.rs`).

use bytes::Bytes;
use floodgate_core::config::Compression;

pub const HEADER_LEN: usize = 32;
/// No frame body is larger than this; a header claiming more is garbage.
pub const MAX_BODY_LEN: usize = 64 * 1024 * 1024;
const RECORD_OVERHEAD: usize = 6;

const CODEC_NONE: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const CODEC_LZ4: u8 = 2;
/// zstd level for frames: the fastest levels keep appends CPU-cheap.
const ZSTD_LEVEL: i32 = 1;

/// A decompressed body larger than this is refused (a CRC-valid frame never holds one;
/// it bounds the allocation a wrong content size could ask for).
const MAX_DECOMPRESSED_LEN: usize = 1024 * 1024 * 1024;

thread_local! {
    // One zstd context per thread, reused for every frame: creating one per frame (about
    // 100 KiB, zeroed) cost several per cent of serve's CPU under steady load.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    // The body being encoded and its compressed form, kept between frames so that a frame
    // does not allocate (and fault in) up to a megabyte twice. Copying the records in stays
    // about 3 % of `ingest`'s CPU at saturation: the records are cold, written by the
    // edge's workers on the other core.
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// A scratch buffer larger than this after a frame is given back rather than kept.
const MAX_KEPT_SCRATCH: usize = 8 * 1024 * 1024;

/// Compresses `body` into `packed` (replacing what it held).
fn zstd_compress_into(body: &[u8], packed: &mut Vec<u8>) -> std::io::Result<()> {
    packed.clear();
    packed.reserve(zstd::zstd_safe::compress_bound(body.len()));
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        c.as_mut()
            .expect("set above")
            .compress_to_buffer(body, packed)
    })?;
    Ok(())
}

#[cfg(test)]
fn zstd_compress(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut packed = Vec::new();
    zstd_compress_into(body, &mut packed)?;
    Ok(packed)
}

fn zstd_decompress(body: &[u8]) -> std::io::Result<Vec<u8>> {
    // Frames record their decompressed size (the compressor is told the length).
    let Some(len) = zstd::bulk::Decompressor::upper_bound(body) else {
        return zstd::stream::decode_all(body);
    };
    if len > MAX_DECOMPRESSED_LEN {
        return Err(invalid("frame body decompresses past 1 GiB"));
    }
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("set above").decompress(body, len)
    })
}

fn lz4_decompress(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let (len, rest) =
        lz4_flex::block::uncompressed_size(body).map_err(|e| invalid(&format!("lz4 body: {e}")))?;
    if len > MAX_DECOMPRESSED_LEN {
        return Err(invalid("frame body decompresses past 1 GiB"));
    }
    let out =
        lz4_flex::block::decompress(rest, len).map_err(|e| invalid(&format!("lz4 body: {e}")))?;
    if out.len() != len {
        return Err(invalid("lz4 body shorter than its recorded size"));
    }
    Ok(out)
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub body_len: u32,
    pub crc: u32,
    pub base_sequence: u64,
    pub record_count: u32,
    pub appended_at_ms: i64,
    pub codec: u8,
}

impl Header {
    pub fn parse(buf: &[u8; HEADER_LEN]) -> Option<Header> {
        let h = Header {
            body_len: u32::from_le_bytes(buf[0..4].try_into().ok()?),
            crc: u32::from_le_bytes(buf[4..8].try_into().ok()?),
            base_sequence: u64::from_le_bytes(buf[8..16].try_into().ok()?),
            record_count: u32::from_le_bytes(buf[16..20].try_into().ok()?),
            appended_at_ms: i64::from_le_bytes(buf[20..28].try_into().ok()?),
            codec: buf[28],
        };
        let sane = (h.body_len as usize) <= MAX_BODY_LEN
            && h.record_count > 0
            && matches!(h.codec, CODEC_NONE | CODEC_ZSTD | CODEC_LZ4)
            && buf[29..32] == [0, 0, 0];
        sane.then_some(h)
    }

    pub fn frame_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.body_len)
    }

    /// The sequence after this frame's last record.
    pub fn next_sequence(&self) -> u64 {
        self.base_sequence + u64::from(self.record_count)
    }
}

/// Encoded size of one record inside an uncompressed body.
pub fn record_len(key: &str, payload: &[u8]) -> usize {
    RECORD_OVERHEAD + key.len() + payload.len()
}

/// Appends one frame holding `records` to `out`. Keys must be at most `u16::MAX` bytes.
pub fn encode(
    out: &mut Vec<u8>,
    base_sequence: u64,
    appended_at_ms: i64,
    compression: Compression,
    records: &[(&str, &[u8])],
) -> std::io::Result<()> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let (body, packed) = &mut *scratch;
        let written = encode_with(
            out,
            base_sequence,
            appended_at_ms,
            compression,
            records,
            body,
            packed,
        );
        for buf in [body, packed] {
            if buf.capacity() > MAX_KEPT_SCRATCH {
                *buf = Vec::new();
            }
        }
        written
    })
}

fn encode_with(
    out: &mut Vec<u8>,
    base_sequence: u64,
    appended_at_ms: i64,
    compression: Compression,
    records: &[(&str, &[u8])],
    body: &mut Vec<u8>,
    packed: &mut Vec<u8>,
) -> std::io::Result<()> {
    body.clear();
    body.reserve(records.iter().map(|(k, p)| record_len(k, p)).sum());
    for (key, payload) in records {
        let key_len =
            u16::try_from(key.len()).map_err(|_| invalid("key longer than 65535 bytes"))?;
        let payload_len =
            u32::try_from(payload.len()).map_err(|_| invalid("payload longer than 4 GiB"))?;
        body.extend_from_slice(&key_len.to_le_bytes());
        body.extend_from_slice(&payload_len.to_le_bytes());
        body.extend_from_slice(key.as_bytes());
        body.extend_from_slice(payload);
    }
    let (codec, body): (u8, &[u8]) = match compression {
        Compression::Zstd => {
            zstd_compress_into(body, packed)?;
            (CODEC_ZSTD, packed)
        }
        Compression::Lz4 => {
            // `compress_prepend_size`'s layout (the size first), into the kept buffer.
            packed.clear();
            packed.resize(4 + lz4_flex::block::get_maximum_output_size(body.len()), 0);
            packed[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
            let n = lz4_flex::block::compress_into(body, &mut packed[4..])
                .map_err(|e| invalid(&format!("lz4: {e}")))?;
            packed.truncate(4 + n);
            (CODEC_LZ4, packed)
        }
        Compression::None => (CODEC_NONE, body),
    };
    if body.len() > MAX_BODY_LEN {
        return Err(invalid("frame body over the 64 MiB limit"));
    }
    let start = out.len();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&base_sequence.to_le_bytes());
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    out.extend_from_slice(&appended_at_ms.to_le_bytes());
    out.extend_from_slice(&[codec, 0, 0, 0]);
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Checks a frame's CRC against its header bytes and body.
pub fn crc_ok(header_bytes: &[u8; HEADER_LEN], header: &Header, body: &[u8]) -> bool {
    let mut h = crc32fast::Hasher::new();
    h.update(&header_bytes[8..]);
    h.update(body);
    h.finalize() == header.crc
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedRecord {
    pub sequence: u64,
    pub appended_at_ms: i64,
    pub key: String,
    pub payload: Bytes,
}

/// Decodes the records of a CRC-checked frame body.
pub fn decode_body(header: &Header, body: Vec<u8>) -> std::io::Result<Vec<DecodedRecord>> {
    records(header, decompress(header, body)?)
}

/// A CRC-checked frame body, decompressed: what [`records`] splits.
pub fn decompress(header: &Header, body: Vec<u8>) -> std::io::Result<Bytes> {
    Ok(Bytes::from(match header.codec {
        CODEC_ZSTD => zstd_decompress(&body)?,
        CODEC_LZ4 => lz4_decompress(&body)?,
        _ => body,
    }))
}

/// The records of a decompressed frame body; each payload is a slice of it.
pub fn records(header: &Header, body: Bytes) -> std::io::Result<Vec<DecodedRecord>> {
    let mut out = Vec::with_capacity(header.record_count as usize);
    let mut pos = 0usize;
    for i in 0..u64::from(header.record_count) {
        let fixed = body
            .get(pos..pos + RECORD_OVERHEAD)
            .ok_or_else(|| invalid("record header past the frame end"))?;
        let key_len = u16::from_le_bytes([fixed[0], fixed[1]]) as usize;
        let payload_len = u32::from_le_bytes([fixed[2], fixed[3], fixed[4], fixed[5]]) as usize;
        pos += RECORD_OVERHEAD;
        let key = body
            .get(pos..pos + key_len)
            .ok_or_else(|| invalid("record key past the frame end"))?;
        let key =
            String::from_utf8(key.to_vec()).map_err(|_| invalid("record key is not UTF-8"))?;
        pos += key_len;
        if pos + payload_len > body.len() {
            return Err(invalid("record payload past the frame end"));
        }
        let payload = body.slice(pos..pos + payload_len);
        pos += payload_len;
        out.push(DecodedRecord {
            sequence: header.base_sequence + i,
            appended_at_ms: header.appended_at_ms,
            key,
            payload,
        });
    }
    if pos != body.len() {
        return Err(invalid("trailing bytes after the last record"));
    }
    Ok(out)
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(compression: Compression) {
        let mut buf = Vec::new();
        encode(
            &mut buf,
            7,
            1234,
            compression,
            &[("k1", b"hello"), ("", b""), ("k3", b"{}")],
        )
        .unwrap();
        let hb: [u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().unwrap();
        let h = Header::parse(&hb).unwrap();
        assert_eq!(h.record_count, 3);
        assert_eq!(h.frame_len() as usize, buf.len());
        let body = buf[HEADER_LEN..].to_vec();
        assert!(crc_ok(&hb, &h, &body));
        let recs = decode_body(&h, body).unwrap();
        assert_eq!(recs[2].sequence, 9);
        assert_eq!(&recs[0].payload[..], b"hello");
        assert_eq!(recs[2].key, "k3");
        // Any flipped bit is caught.
        for i in 8..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            let hb: [u8; HEADER_LEN] = bad[..HEADER_LEN].try_into().unwrap();
            if let Some(h) = Header::parse(&hb) {
                assert!(
                    !crc_ok(&hb, &h, &bad[HEADER_LEN..]),
                    "flip at {i} undetected"
                );
            }
        }
    }

    /// Frames encoded one after another on one thread share its scratch buffers: each
    /// holds its own records only, whether the frame before was larger or smaller.
    #[test]
    fn consecutive_frames_hold_only_their_own_records() {
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let big = vec![b'x'; 3000];
            let batches: [&[(&str, &[u8])]; 3] = [
                &[("a", &big), ("b", &big)],
                &[("c", b"small")],
                &[("d", b"{}"), ("e", b"[]")],
            ];
            let mut out = Vec::new();
            for (base, records) in batches.iter().enumerate() {
                encode(&mut out, base as u64 * 10, 0, compression, records).unwrap();
            }
            let mut at = 0;
            for records in batches {
                let hb: [u8; HEADER_LEN] = out[at..at + HEADER_LEN].try_into().unwrap();
                let h = Header::parse(&hb).unwrap();
                let body = out[at + HEADER_LEN..at + h.frame_len() as usize].to_vec();
                assert!(crc_ok(&hb, &h, &body));
                let got: Vec<(String, Vec<u8>)> = decode_body(&h, body)
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.key.to_string(), r.payload.to_vec()))
                    .collect();
                let want: Vec<(String, Vec<u8>)> = records
                    .iter()
                    .map(|(k, p)| (k.to_string(), p.to_vec()))
                    .collect();
                assert_eq!(got, want, "{compression:?}");
                at += h.frame_len() as usize;
            }
            assert_eq!(at, out.len());
        }
    }

    /// The kept buffer's lz4 body is the bytes `compress_prepend_size` gives.
    #[test]
    fn lz4_bodies_are_compress_prepend_size() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i % 7) as u8).collect();
        let records: &[(&str, &[u8])] = &[("k", &payload), ("key-2", b"{}")];
        let mut out = Vec::new();
        encode(&mut out, 0, 0, Compression::Lz4, records).unwrap();
        let mut plain = Vec::new();
        encode(&mut plain, 0, 0, Compression::None, records).unwrap();
        let want = lz4_flex::block::compress_prepend_size(&plain[HEADER_LEN..]);
        assert_eq!(&out[HEADER_LEN..], &want[..]);
    }

    #[test]
    fn roundtrip_plain() {
        roundtrip(Compression::None);
    }

    #[test]
    fn roundtrip_zstd() {
        roundtrip(Compression::Zstd);
    }

    #[test]
    fn roundtrip_lz4() {
        roundtrip(Compression::Lz4);
    }

    /// A CRC-valid frame whose lz4 body lies about its size, or is cut, is an error, not
    /// a panic or a 4 GiB allocation.
    #[test]
    fn lz4_bodies_that_lie_are_refused() {
        let body: Vec<u8> = (0..5000u32).map(|b| (b % 13) as u8).collect();
        let packed = lz4_flex::block::compress_prepend_size(&body);
        assert_eq!(lz4_decompress(&packed).unwrap(), body);
        let mut larger = packed.clone();
        larger[..4].copy_from_slice(&(body.len() as u32 + 10).to_le_bytes());
        assert!(lz4_decompress(&larger).is_err());
        let mut huge = packed.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(lz4_decompress(&huge).is_err());
        assert!(lz4_decompress(&packed[..packed.len() / 2]).is_err());
        assert!(lz4_decompress(&packed[..2]).is_err());
    }

    /// Bodies with and without a recorded size (a streaming encoder leaves it out), many
    /// times on one thread's reused contexts, and a size past the limit refused.
    #[test]
    fn zstd_bodies_decode_with_or_without_a_recorded_size() {
        for i in 0..50u32 {
            let body: Vec<u8> = (0..(1000 + i * 37)).map(|b| (b % 251) as u8).collect();
            let sized = zstd_compress(&body).unwrap();
            assert!(zstd::bulk::Decompressor::upper_bound(&sized).is_some());
            assert_eq!(zstd_decompress(&sized).unwrap(), body);
            let streamed = zstd::stream::encode_all(body.as_slice(), 1).unwrap();
            assert_eq!(zstd_decompress(&streamed).unwrap(), body);
        }
        let huge = zstd_compress(&vec![0u8; MAX_DECOMPRESSED_LEN + 1]).unwrap();
        assert!(zstd_decompress(&huge).is_err());
    }
}
