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
