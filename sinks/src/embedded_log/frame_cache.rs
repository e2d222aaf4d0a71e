//! The frames of a shard decoded last, kept so that the consumers reading the same records
//! (bookings and the lake, each caught up, a few milliseconds apart) decompress and
//! CRC-check each frame once between them, not once each.
//!
//! A frame is found by where it lies (its segment and offset) *and* by its whole header,
//! which carries its first sequence, its record count, its length and its body's CRC: a
//! frame is only ever read below the durable watermark, where nothing rewrites it, and a
//! segment repaired or replaced on another open starts with an empty cache; the header
//! check is there so that any other frame at that place still reads from the file.
//!
//! A hit does not read the body on disk again, so it does not check its CRC again either:
//! the copy kept was checked when it was read, moments before, and a read of the file in
//! that window would have come from the page cache, not the disk, all the same.

use std::collections::VecDeque;
use std::sync::Mutex;
#[cfg(test)]
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::frame::HEADER_LEN;

/// Frames kept at most, per shard. Consumers read every `batch_linger` (25 ms), each on
/// its own clock, so the cache must span that: at 150,000 events/s on 4 shards a group
/// commit writes about 1,500 frames a second a shard (of ~25 records), 40 in 25 ms.
const KEEP_FRAMES: usize = 512;
/// Decompressed bytes kept at most, per shard (payloads the consumers' batches often still
/// hold anyway).
const KEEP_BYTES: usize = 4 << 20;

#[derive(Debug, Default)]
pub(crate) struct FrameCache {
    frames: Mutex<Frames>,
    #[cfg(test)]
    hits: AtomicU64,
}

#[derive(Debug, Default)]
struct Frames {
    list: VecDeque<Cached>,
    /// The bodies' bytes in `list`.
    bytes: usize,
}

#[derive(Debug)]
struct Cached {
    segment_base: u64,
    offset: u64,
    header: [u8; HEADER_LEN],
    body: Bytes,
}

impl FrameCache {
    /// The decompressed body of the frame at `offset` of the segment starting at
    /// `segment_base`, when it is kept with this very header.
    pub(crate) fn get(
        &self,
        segment_base: u64,
        offset: u64,
        header: &[u8; HEADER_LEN],
    ) -> Option<Bytes> {
        let frames = self.lock();
        let body = frames
            .list
            .iter()
            .rev()
            .find(|c| c.segment_base == segment_base && c.offset == offset && c.header == *header)
            .map(|c| c.body.clone());
        drop(frames);
        #[cfg(test)]
        if body.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        body
    }

    /// Keeps a frame just decoded (its body CRC-checked, decompressed and split into its
    /// records), dropping the oldest past [`KEEP_FRAMES`] or [`KEEP_BYTES`]. A body larger
    /// than that is not kept. Two readers that missed the same frame at once may both keep
    /// it: the later copy is found first, and both age out.
    pub(crate) fn put(
        &self,
        segment_base: u64,
        offset: u64,
        header: [u8; HEADER_LEN],
        body: Bytes,
    ) {
        if body.len() > KEEP_BYTES {
            return;
        }
        let mut frames = self.lock();
        frames.bytes += body.len();
        frames.list.push_back(Cached {
            segment_base,
            offset,
            header,
            body,
        });
        while frames.list.len() > KEEP_FRAMES || frames.bytes > KEEP_BYTES {
            let Some(old) = frames.list.pop_front() else {
                break;
            };
            frames.bytes -= old.body.len();
        }
    }

    /// The frames; a reader that panicked holding them left them whole (each change is
    /// one push or pop).
    fn lock(&self) -> std::sync::MutexGuard<'_, Frames> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many frames are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().list.len()
    }

    /// How many reads found their frame here.
    #[cfg(test)]
    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_found_by_its_place_and_its_whole_header() {
        let cache = FrameCache::default();
        let header = [7u8; HEADER_LEN];
        cache.put(100, 0, header, Bytes::from_static(b"body"));
        assert_eq!(cache.get(100, 0, &header).as_deref(), Some(&b"body"[..]));
        // Another segment, another offset, or any other header: read from the file.
        assert_eq!(cache.get(101, 0, &header), None);
        assert_eq!(cache.get(100, 32, &header), None);
        let mut other = header;
        other[HEADER_LEN - 1] ^= 1;
        assert_eq!(cache.get(100, 0, &other), None);
        assert_eq!(cache.hits(), 1);
    }

    #[test]
    fn it_keeps_the_newest_frames_within_its_bounds() {
        let cache = FrameCache::default();
        let header = [1u8; HEADER_LEN];
        for i in 0..(KEEP_FRAMES as u64 + 4) {
            cache.put(0, i, header, Bytes::from(vec![0u8; 10]));
        }
        assert_eq!(cache.get(0, 3, &header), None, "the oldest dropped");
        assert!(cache.get(0, 4, &header).is_some());
        // Bytes: two frames of more than half the bound cannot both stay.
        let big = KEEP_BYTES / 2 + 1;
        cache.put(1, 0, header, Bytes::from(vec![0u8; big]));
        cache.put(1, 1, header, Bytes::from(vec![0u8; big]));
        assert_eq!(cache.get(1, 0, &header), None);
        assert!(cache.get(1, 1, &header).is_some());
        let frames = cache.lock();
        let held: usize = frames.list.iter().map(|c| c.body.len()).sum();
        assert_eq!(held, frames.bytes);
        assert!(held <= KEEP_BYTES);
        drop(frames);
        // A body larger than the bound is not kept at all.
        cache.put(2, 0, header, Bytes::from(vec![0u8; KEEP_BYTES + 1]));
        assert_eq!(cache.get(2, 0, &header), None);
    }
}
