//! The caching allocator of device memory: requests are rounded up to a size
//! class (at most 1/4 over the request, 512 B granules below 2 KiB) and freed
//! blocks go to that class's free list instead of back to the driver, so a
//! training step that allocates the same shapes every time stops calling
//! cuMemAlloc after the first. One stream per device makes reuse safe without
//! events: a block freed after a launch is only handed to work queued later on
//! the same stream. Generic over `RawMemory` so the bookkeeping is tested
//! without a GPU.

use anyhow::{Context, Result};
use std::collections::BTreeMap;

/// The driver side of the allocator: plain allocations and frees.
pub trait RawMemory {
    /// `bytes` (> 0) of device memory; Err on out-of-memory.
    fn raw_alloc(&mut self, bytes: usize) -> Result<u64>;
    /// Give `ptr` (from `raw_alloc` of `bytes`) back to the driver.
    fn raw_free(&mut self, ptr: u64, bytes: usize) -> Result<()>;
}

/// Counters of one allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes (size classes) held by live buffers.
    pub in_use: usize,
    /// Bytes obtained from the driver and not yet returned (in use + cached).
    pub reserved: usize,
    /// The largest `reserved` so far.
    pub peak_reserved: usize,
    /// Allocations served from a free list.
    pub hits: u64,
    /// Allocations that went to the driver.
    pub misses: u64,
    /// Blocks returned to the driver (trims and out-of-memory retries).
    pub released: u64,
}

/// The size class of a request: at least 512 bytes; otherwise rounded up to a
/// multiple of a quarter of the request's power of two, so four classes per
/// octave and at most 25% unused.
pub fn size_class(bytes: usize) -> usize {
    const MIN: usize = 512;
    if bytes <= MIN {
        return MIN;
    }
    let top = usize::BITS - 1 - bytes.leading_zeros(); // floor(log2(bytes))
    let step = (1usize << top.saturating_sub(2)).max(MIN);
    bytes.div_ceil(step) * step
}

/// Size-class free lists over a `RawMemory`.
pub struct CachingAllocator<M: RawMemory> {
    raw: M,
    free: BTreeMap<usize, Vec<u64>>,
    stats: AllocStats,
}

impl<M: RawMemory> CachingAllocator<M> {
    pub fn new(raw: M) -> Self {
        CachingAllocator {
            raw,
            free: BTreeMap::new(),
            stats: AllocStats::default(),
        }
    }

    /// A block for `bytes` (> 0): its address and its class size. A cached
    /// block of the class if there is one; else the driver; on out-of-memory
    /// every cached block is released and the driver asked once more.
    pub fn alloc(&mut self, bytes: usize) -> Result<(u64, usize)> {
        anyhow::ensure!(bytes > 0, "a device allocation of 0 bytes");
        let class = size_class(bytes);
        if let Some(ptr) = self.free.get_mut(&class).and_then(|v| v.pop()) {
            self.stats.hits += 1;
            self.stats.in_use += class;
            return Ok((ptr, class));
        }
        let ptr = match self.raw.raw_alloc(class) {
            Ok(p) => p,
            Err(first) => {
                let cached = self.cached_bytes();
                if cached == 0 {
                    return Err(first);
                }
                self.trim()?;
                self.raw.raw_alloc(class).with_context(|| {
                    format!("after releasing {cached} cached bytes (first attempt: {first:#})")
                })?
            }
        };
        self.stats.misses += 1;
        self.stats.in_use += class;
        self.stats.reserved += class;
        self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.reserved);
        Ok((ptr, class))
    }

    /// Put a block from `alloc` back on its class's free list.
    pub fn release(&mut self, ptr: u64, class: usize) {
        debug_assert_eq!(size_class(class), class, "not a size class");
        self.stats.in_use -= class;
        self.free.entry(class).or_default().push(ptr);
    }

    /// Return every cached block to the driver (the caller makes sure no queued
    /// work still uses them: the device synchronizes its stream first).
    pub fn trim(&mut self) -> Result<()> {
        let free = std::mem::take(&mut self.free);
        let mut first_err = None;
        for (class, ptrs) in free {
            for p in ptrs {
                match self.raw.raw_free(p, class) {
                    Ok(()) => {
                        self.stats.reserved -= class;
                        self.stats.released += 1;
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e.context("releasing cached device memory")),
            None => Ok(()),
        }
    }

    /// Bytes sitting in free lists.
    pub fn cached_bytes(&self) -> usize {
        self.free.iter().map(|(c, v)| c * v.len()).sum()
    }

    pub fn stats(&self) -> AllocStats {
        self.stats
    }

    pub fn raw(&self) -> &M {
        &self.raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Host-side stand-in for the driver: hands out fake addresses, remembers
    /// live blocks, fails past a capacity.
    #[derive(Default)]
    struct Fake {
        next: u64,
        live: HashMap<u64, usize>,
        capacity: usize,
        frees: usize,
    }

    impl RawMemory for Fake {
        fn raw_alloc(&mut self, bytes: usize) -> Result<u64> {
            let used: usize = self.live.values().sum();
            anyhow::ensure!(used + bytes <= self.capacity, "out of memory");
            self.next += 1 << 32;
            self.live.insert(self.next, bytes);
            Ok(self.next)
        }
        fn raw_free(&mut self, ptr: u64, bytes: usize) -> Result<()> {
            let b = self.live.remove(&ptr).context("double free")?;
            anyhow::ensure!(b == bytes, "freed {bytes} of a {b}-byte block");
            self.frees += 1;
            Ok(())
        }
    }

    fn fake(capacity: usize) -> CachingAllocator<Fake> {
        CachingAllocator::new(Fake {
            capacity,
            ..Fake::default()
        })
    }

    #[test]
    fn size_classes_bound_the_waste() {
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(4096), 4096);
        assert_eq!(size_class(4097), 5120);
        let mut prev = 0;
        for b in (1..5_000_000usize).step_by(997) {
            let c = size_class(b);
            assert!(c >= b, "{b} -> {c}");
            assert!(c >= prev, "classes not monotone at {b}");
            assert!(b <= 2048 || (c - b) * 4 <= b, "{b} -> {c} wastes over 25%");
            assert_eq!(size_class(c), c, "class of a class");
            prev = c;
        }
        // few distinct classes: four per octave above 2 KiB
        let classes: std::collections::BTreeSet<usize> =
            (1..(1usize << 20)).map(size_class).collect();
        assert!(classes.len() < 4 * 20 + 4, "{} classes", classes.len());
    }

    #[test]
    fn freed_blocks_are_reused_by_class() {
        let mut a = fake(1 << 30);
        let (p1, c1) = a.alloc(1000).unwrap();
        let (p2, _) = a.alloc(1000).unwrap();
        assert_ne!(p1, p2);
        a.release(p1, c1);
        assert_eq!(a.cached_bytes(), c1);
        // same class (1000 and 1020 both round to 1024): the cached block comes back
        let (p3, c3) = a.alloc(1020).unwrap();
        assert_eq!((p3, c3), (p1, c1));
        // another class goes to the driver
        let (p4, c4) = a.alloc(70_000).unwrap();
        assert!(p4 != p1 && p4 != p2);
        let s = a.stats();
        assert_eq!((s.hits, s.misses), (1, 3));
        assert_eq!(s.in_use, 2 * 1024 + c4);
        assert_eq!(s.reserved, s.in_use);
        assert_eq!(a.raw().live.len(), 3);
    }

    #[test]
    fn trim_returns_everything_cached() {
        let mut a = fake(1 << 30);
        let blocks: Vec<_> = (1..50).map(|i| a.alloc(i * 777).unwrap()).collect();
        let peak = a.stats().reserved;
        for (p, c) in blocks {
            a.release(p, c);
        }
        assert_eq!(a.stats().in_use, 0);
        assert_eq!(a.stats().reserved, peak);
        a.trim().unwrap();
        assert!(a.raw().live.is_empty());
        assert_eq!(a.raw().frees, 49);
        let s = a.stats();
        assert_eq!((s.reserved, s.peak_reserved, s.released), (0, peak, 49));
        assert_eq!(a.cached_bytes(), 0);
    }

    #[test]
    fn out_of_memory_releases_the_cache_and_retries() {
        let mut a = fake(3 * 4096);
        let b: Vec<_> = (0..3).map(|_| a.alloc(4096).unwrap()).collect();
        for &(p, c) in &b {
            a.release(p, c);
        }
        // 8192 bytes fit only once the three cached 4 KiB blocks are gone
        let (_, c) = a.alloc(8192).unwrap();
        assert_eq!(c, 8192);
        assert_eq!(a.stats().released, 3);
        assert_eq!(a.stats().reserved, 8192);
        // nothing cached and nothing free: the driver's error comes through
        let e = a.alloc(8192).unwrap_err();
        assert!(format!("{e:#}").contains("out of memory"), "{e:#}");
        assert!(a.alloc(0).is_err());
    }
}
