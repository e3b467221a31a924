//! Everything the kernel programs and userspace must agree on: map key/value layouts, map
//! names, pin paths, ports and counters. This is the only place a map layout is written; both
//! `mesh-ebpf` (kernel side) and `mesh-node` (userspace) use it.
//!
//! Byte-order conventions (the same in every map):
//! - addresses are [`Addr`]: 16 bytes in network order, IPv4 stored IPv4-mapped
//!   (`::ffff:a.b.c.d`), held as four `u32` words exactly as they sit in memory;
//! - ports are host order `u16`.
#![no_std]

pub mod maps;
pub mod ports;

pub use maps::*;
