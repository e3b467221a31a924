//! Kernel TLS sockets' record sequence numbers (`getsockopt(SOL_TLS, TLS_TX / TLS_RX)`), read
//! to retire a kTLS tunnel before its peer must re-key (`proxy::hbone::ktls`).

use std::io;
use std::os::fd::RawFd;

const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;

/// A kTLS socket's direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Tx,
    Rx,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Tx => "tx",
            Direction::Rx => "rx",
        }
    }
}

/// The sequence number of the next record `fd` sends (`Tx`) or expects (`Rx`).
pub fn record_seq(fd: RawFd, dir: Direction) -> io::Result<u64> {
    let opt = match dir {
        Direction::Tx => TLS_TX,
        Direction::Rx => TLS_RX,
    };
    // The kernel answers only for the exact size of the cipher's `tls12_crypto_info_*`:
    // 56 bytes for AES-GCM-256 and ChaCha20-Poly1305, 40 for AES-GCM-128 (EINVAL otherwise).
    let mut last = io::Error::from_raw_os_error(libc::EINVAL);
    for size in [56usize, 40] {
        let mut buf = [0u8; 56];
        let mut len = size as libc::socklen_t;
        // SAFETY: `buf` is valid for writes of `len` (≤ 56) bytes; the kernel writes at most that.
        let r = unsafe { libc::getsockopt(fd, SOL_TLS, opt, buf.as_mut_ptr().cast(), &mut len) };
        if r == 0 {
            return parse_seq(buf.get(..len as usize).unwrap_or(&[]));
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EINVAL) {
            break;
        }
    }
    Err(last)
}

/// Every `tls12_crypto_info_*` struct (`linux/tls.h`: version and cipher, then IV, key, salt
/// as the cipher needs) ends with `rec_seq[8]`, big-endian.
fn parse_seq(info: &[u8]) -> io::Result<u64> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TLS crypto info of {} bytes", info.len()),
        )
    };
    if info.len() < 4 + 8 {
        return Err(bad());
    }
    let tail: [u8; 8] = info[info.len() - 8..].try_into().map_err(|_| bad())?;
    Ok(u64::from_be_bytes(tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_is_the_struct_tail_whatever_the_cipher() {
        // AES-GCM-128: info 4 + iv 8 + key 16 + salt 4 + rec_seq 8.
        let mut gcm128 = vec![0xAAu8; 32];
        gcm128.extend_from_slice(&0x0000_0000_0080_0001u64.to_be_bytes());
        assert_eq!(parse_seq(&gcm128).expect("40 bytes"), 0x80_0001);
        // AES-GCM-256 / ChaCha20-Poly1305: 56 bytes.
        let mut gcm256 = vec![0x55u8; 48];
        gcm256.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(parse_seq(&gcm256).expect("56 bytes"), 7);
        assert!(parse_seq(&[0; 4]).is_err());
    }

    #[test]
    fn a_plain_socket_has_no_tls_sequence() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        use std::os::fd::AsRawFd;
        assert!(record_seq(s.as_raw_fd(), Direction::Tx).is_err());
    }
}
