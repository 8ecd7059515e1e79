//! The node's interfaces and IPv4 addresses, as seen from the agent's network namespace
//! (netlink-backed libc calls; /sys/class/net would show the namespace /sys was mounted in).
use std::{ffi::CStr, net::Ipv4Addr};

/// Names of all interfaces.
pub fn interface_names() -> std::io::Result<Vec<String>> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut names = Vec::new();
        let mut entry = list;
        while (*entry).if_index != 0 {
            names.push(CStr::from_ptr((*entry).if_name).to_string_lossy().into_owned());
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(names)
    }
}

/// (interface, address) for every IPv4 address, loopback excluded.
pub fn ipv4_addresses() -> std::io::Result<Vec<(String, Ipv4Addr)>> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs hands out a linked list freed with freeifaddrs; every pointer is
    // checked before use and sockaddr_in is read only when the family says AF_INET.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() && (*ifa.ifa_addr).sa_family as i32 == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !addr.is_loopback() {
                    out.push((CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned(), addr));
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`), as the programs'
/// `bpf_get_netns_cookie` gives it for a socket there.
pub fn netns_cookie() -> std::io::Result<u64> {
    // SAFETY: a socket we own, closed below; getsockopt writes at most `len` bytes to `cookie`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        let result = if rc == 0 { Ok(cookie) } else { Err(std::io::Error::last_os_error()) };
        libc::close(fd);
        result
    }
}

/// The kernel driver of `interface` (`veth`, `mlx5_core`, ...), from `ETHTOOL_GDRVINFO`.
pub fn driver(interface: &str) -> std::io::Result<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h), 196 bytes.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    /// `struct ifreq` with the `ifr_data` member of its union, 40 bytes.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        _union_rest: [u8; 16],
    }
    if interface.len() >= libc::IFNAMSIZ || interface.contains('\0') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an interface name"));
    }
    let mut info = DrvInfo { cmd: ETHTOOL_GDRVINFO, driver: [0; 32], rest: [0; 160] };
    let mut request = IfReq { name: [0; libc::IFNAMSIZ], data: &mut info, _union_rest: [0; 16] };
    request.name[..interface.len()].copy_from_slice(interface.as_bytes());
    // SAFETY: a socket we own, closed below; the ioctl reads the name and writes at most
    // size_of::<DrvInfo>() bytes through `data`, which points at `info`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut request as *mut IfReq);
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(error);
        }
    }
    let len = info.driver.iter().position(|b| *b == 0).unwrap_or(info.driver.len());
    Ok(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}
