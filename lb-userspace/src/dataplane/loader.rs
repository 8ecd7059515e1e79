//! Loading the programs, attaching them through pinned links, and removing all of it.
//!
//! Layout under `--bpffs-dir`:
//! - `<MAP_NAME>`: every map of `lb_common::maps::ALL`, reused when already pinned, so a
//!   restarted agent keeps the services, backends and connections of the one before. A
//!   pinned map whose layout the programs cannot use (`layout`) is recreated as
//!   `<MAP_NAME>-new` and replaces the old pin only once the agent has filled it
//!   (`swap_in_staged_maps`), right before the new programs go into the links;
//! - `links/<hook>@<interface>`: one bpf_link per attachment. A restarted agent swaps its
//!   program into the existing link atomically (`bpf_link_update`): no packet goes unhandled.
//! - `links/<sock hook>@cgroup`: the socket balancing programs on the `--cgroup-path`
//!   cgroup. A restarted agent attaches its programs next to the old ones, then replaces the
//!   pins, which detaches the old ones: a socket always meets at least one.
use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::Map,
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::maps;

use super::{layout, EBPF_OBJECT};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {program}: {source}")]
    Program { program: &'static str, source: ProgramError },
    #[error("attaching {hook} to {interface}: {source}")]
    Attach { hook: &'static str, interface: String, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("map {name}: unexpected type {found}")]
    MapType { name: &'static str, found: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DataplaneError + '_ {
    move |source| DataplaneError::Io { path: path.to_owned(), source }
}

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// XDP on an external interface: the node's traffic from the fabric.
    XdpIngress,
    /// The same pipeline at TC ingress, for external interfaces where XDP cannot answer
    /// (`external`).
    TcExternal,
    /// TC ingress on a pod interface: traffic from a local pod.
    TcIngress,
    /// TC egress on any interface: after the kernel routed.
    TcEgress,
}

impl Hook {
    pub const fn program(self) -> &'static str {
        match self {
            Self::XdpIngress => "xlb_xdp_ingress",
            Self::TcExternal => "xlb_tc_external",
            Self::TcIngress => "xlb_tc_ingress",
            Self::TcEgress => "xlb_tc_egress",
        }
    }

    pub const ALL: [Hook; 4] = [Self::XdpIngress, Self::TcExternal, Self::TcIngress, Self::TcEgress];

    /// The name of its links' pins: `links/<pin name>@<interface>`.
    pub const fn pin_name(self) -> &'static str {
        match self {
            Self::XdpIngress => "xdp_ingress",
            Self::TcExternal => "tc_external",
            Self::TcIngress => "tc_ingress",
            Self::TcEgress => "tc_egress",
        }
    }
}

/// The socket balancing programs, attached to one cgroup for the node's processes.
const SOCKET_PROGRAMS: [&str; 4] =
    ["xlb_sock_connect4", "xlb_sock_sendmsg4", "xlb_sock_recvmsg4", "xlb_sock_getpeername4"];

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    links_dir: Option<PathBuf>,
    /// The `--bpffs-dir`, when pinned.
    dir: Option<PathBuf>,
    /// Maps recreated under their staging names, not swapped in yet (`XLB_CONFIG` last).
    staged: Vec<&'static str>,
}

/// Map sizes: the agent's `--max-services`, `--max-backends` and `--conntrack-size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    /// Sizes the conntrack, service conntrack and SNAT tables alike.
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self { services: maps::SERVICES_MAX, backends: maps::BACKENDS_MAX, conntrack: maps::CONNTRACK_MAX }
    }
}

impl MapSizes {
    /// The entries map `name` is created with.
    pub fn max_entries(&self, name: &str) -> u32 {
        match name {
            maps::SERVICES => self.services,
            maps::BACKENDS => self.backends,
            maps::CT_SERVICE | maps::CONNTRACK | maps::NAT => self.conntrack,
            // Counters are per Service port, never more than frontends (a u16 index).
            maps::SERVICE_STATS | maps::SERVICE_NAMES => {
                self.services.min(lb_common::stats::SERVICE_STATS_MAX)
            }
            maps::AFFINITY => maps::AFFINITY_MAX,
            maps::SOURCE_RANGES => maps::SOURCE_RANGES_MAX,
            maps::SOCK_REVNAT => maps::SOCK_REVNAT_MAX,
            maps::FRAGMENTS => maps::FRAGMENTS_MAX,
            // XLB_CONFIG: one slot.
            _ => 1,
        }
    }
}

fn loader<'a>(sizes: MapSizes) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    for name in maps::ALL {
        loader.map_max_entries(name, sizes.max_entries(name));
    }
    loader
}

impl Dataplane {
    /// Loads the programs with every map pinned under `dir`, reusing the pinned maps whose
    /// layout they can use (`layout::plan`; a connection table keeps its size). The others
    /// are created under staging names: the programs must then not replace the running ones
    /// before the agent has filled them and called `swap_in_staged_maps`.
    pub fn load_pinned(dir: &Path, sizes: MapSizes) -> Result<Self> {
        let links_dir = dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(io_err(&links_dir))?;
        let staged = layout::plan(dir, sizes)?;
        let mut loader = loader(sizes);
        for name in maps::ALL {
            let path = if staged.contains(&name) { layout::staged_pin(dir, name) } else { dir.join(name) };
            loader.map_pin_path(name, path);
        }
        let ebpf = loader.load(EBPF_OBJECT)?;
        let mut dp = Self { ebpf, links_dir: Some(links_dir), dir: Some(dir.to_owned()), staged };
        dp.load_programs()?;
        Ok(dp)
    }

    /// Loads the programs with private maps: for BPF_PROG_TEST_RUN, nothing is attached.
    pub fn load_unpinned(sizes: MapSizes) -> Result<Self> {
        let ebpf = loader(sizes).load(EBPF_OBJECT)?;
        let mut dp = Self { ebpf, links_dir: None, dir: None, staged: Vec::new() };
        dp.load_programs()?;
        Ok(dp)
    }

    /// Whether maps were recreated under staging names (their pinned layout did not fit):
    /// then the running programs keep serving with the pinned maps until the agent has
    /// filled the new ones and swapped them in (`swap_in_staged_maps`), and only then may
    /// these programs be attached.
    pub fn has_staged_maps(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Moves the recreated maps to their names, replacing the old pins (the programs still
    /// running keep their maps until they are replaced), `XLB_CONFIG`, which records the
    /// layout version, last.
    pub fn swap_in_staged_maps(&mut self) -> Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        for name in std::mem::take(&mut self.staged) {
            let (staged, pin) = (layout::staged_pin(dir, name), dir.join(name));
            std::fs::rename(&staged, &pin).map_err(io_err(&pin))?;
            tracing::info!("map {name}: the recreated map replaced the pinned one");
        }
        Ok(())
    }

    fn load_programs(&mut self) -> Result<()> {
        let xdp: &mut Xdp = self.program_mut(Hook::XdpIngress)?;
        xdp.load()
            .map_err(|source| DataplaneError::Program { program: Hook::XdpIngress.program(), source })?;
        for hook in [Hook::TcExternal, Hook::TcIngress, Hook::TcEgress] {
            let tc: &mut SchedClassifier = self.program_mut(hook)?;
            tc.load().map_err(|source| DataplaneError::Program { program: hook.program(), source })?;
        }
        for name in SOCKET_PROGRAMS {
            let sock: &mut CgroupSockAddr = self.named_program_mut(name)?;
            // A bpf_link takes no attach flags ("Single" is 0); cgroup links always coexist
            // with other links on the cgroup, which is what the hand-over below needs.
            sock.load().map_err(|source| DataplaneError::Program { program: name, source })?;
        }
        Ok(())
    }

    fn program_mut<'a, P>(&'a mut self, hook: Hook) -> Result<&'a mut P>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        self.named_program_mut(hook.program())
    }

    fn named_program_mut<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Program { program: name, source: ProgramError::NotLoaded })?;
        program.try_into().map_err(|source| DataplaneError::Program { program: name, source })
    }

    /// The program of `hook`, e.g. for `TestRun`.
    pub fn program(&self, hook: Hook) -> Option<&aya::programs::Program> {
        self.ebpf.program(hook.program())
    }

    /// Takes a map out of the object (each map can be taken once).
    pub fn take_map(&mut self, name: &'static str) -> Result<Map> {
        self.ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name))
    }

    /// Attaches `hook`'s program to `interface` through a pinned link. An existing pinned
    /// link is updated in place (atomic replacement); a stale one (its interface is gone)
    /// is replaced by a new attachment.
    pub fn attach(&mut self, hook: Hook, interface: &str) -> Result<()> {
        let links_dir = self.links_dir.clone().expect("attach needs a pinned dataplane");
        let pin = links_dir.join(format!("{}@{interface}", hook.pin_name()));
        let attach_err = |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Attach {
            hook: hook.program(),
            interface: interface.to_string(),
            source,
        };
        if let Ok(existing) = PinnedLink::from_pin(&pin) {
            match self.replace_in_link(hook, FdLink::from(existing)) {
                Ok(()) => return Ok(()),
                // The link's interface is gone (ENOLINK): drop the pin and attach anew.
                Err(e) if is_defunct_link(&e) => {
                    tracing::info!(%interface, hook = hook.program(), "pinned link is defunct, attaching anew");
                    std::fs::remove_file(&pin).map_err(io_err(&pin))?;
                }
                // Anything else leaves the live link, and the program in it, as it is.
                Err(e) => return Err(attach_err(e.into())),
            }
        }
        let link: FdLink = match hook {
            Hook::XdpIngress => {
                let xdp: &mut Xdp = self.program_mut(hook)?;
                let id = xdp.attach(interface, XdpMode::Default).map_err(|e| attach_err(e.into()))?;
                let link = xdp.take_link(id).map_err(|e| attach_err(e.into()))?;
                FdLink::try_from(link).map_err(|e| attach_err(e.into()))?
            }
            Hook::TcExternal | Hook::TcIngress | Hook::TcEgress => {
                let attach_type =
                    if hook == Hook::TcEgress { TcAttachType::Egress } else { TcAttachType::Ingress };
                let tc: &mut SchedClassifier = self.program_mut(hook)?;
                let id = tc.attach(interface, attach_type).map_err(|e| attach_err(e.into()))?;
                let link = tc.take_link(id).map_err(|e| attach_err(e.into()))?;
                FdLink::try_from(link).map_err(|e| attach_err(e.into()))?
            }
        };
        link.pin(&pin).map_err(|source| DataplaneError::Pin { path: pin.clone(), source })?;
        Ok(())
    }

    /// Attaches the socket balancing programs to the cgroup v2 directory `cgroup` (the node's
    /// processes in it and below). Replaces the programs of an earlier agent without a gap.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let links_dir = self.links_dir.clone().expect("attach needs a pinned dataplane");
        let cgroup_dir = std::fs::File::open(cgroup).map_err(io_err(cgroup))?;
        for name in SOCKET_PROGRAMS {
            let attach_err = |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Attach {
                hook: name,
                interface: cgroup.display().to_string(),
                source,
            };
            let sock: &mut CgroupSockAddr = self.named_program_mut(name)?;
            // A bpf_link takes no attach flags ("Single" is 0); cgroup links always coexist
            // with other links on the cgroup, which is what the hand-over below needs.
            let id = sock.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(|e| attach_err(e.into()))?;
            let link = FdLink::try_from(sock.take_link(id).map_err(|e| attach_err(e.into()))?)
                .map_err(|e| attach_err(e.into()))?;
            // Pin under a temporary name, then rename over the old pin: the old link loses its
            // last reference and detaches only once the new one is in place.
            let pin = links_dir.join(format!("{name}@cgroup"));
            // (bpffs refuses names with a dot.)
            let staged = links_dir.join(format!("{name}@cgroup-new"));
            let _ = std::fs::remove_file(&staged);
            link.pin(&staged).map_err(|source| DataplaneError::Pin { path: staged.clone(), source })?;
            std::fs::rename(&staged, &pin).map_err(io_err(&pin))?;
        }
        Ok(())
    }

    /// Swaps `hook`'s program into the pinned `link` (`bpf_link_update`: atomic).
    fn replace_in_link(&mut self, hook: Hook, link: FdLink) -> Result<(), ProgramError> {
        let not_ours = |e: aya::programs::links::LinkError| ProgramError::IOError(io::Error::other(e));
        match hook {
            Hook::XdpIngress => {
                let xdp: &mut Xdp = self.program_mut(hook).map_err(|_| ProgramError::NotLoaded)?;
                let id = xdp.attach_to_link(XdpLink::try_from(link).map_err(not_ours)?)?;
                // Dropping our handle leaves the pinned link attached.
                drop(xdp.take_link(id)?);
            }
            Hook::TcExternal | Hook::TcIngress | Hook::TcEgress => {
                let tc: &mut SchedClassifier = self.program_mut(hook).map_err(|_| ProgramError::NotLoaded)?;
                let id = tc.attach_to_link(SchedClassifierLink::try_from(link).map_err(not_ours)?)?;
                drop(tc.take_link(id)?);
            }
        }
        Ok(())
    }

    /// Removes the pinned links of `interface` (e.g. a pod interface that went away): a link
    /// whose interface is gone holds a program nothing runs.
    pub fn forget_interface(&mut self, interface: &str) -> Result<()> {
        Hook::ALL.into_iter().try_for_each(|hook| self.detach(hook, interface))
    }

    /// Detaches `hook`'s program from `interface` by removing its pinned link, if any (an
    /// external interface that moved to the other ingress hook).
    pub fn detach(&mut self, hook: Hook, interface: &str) -> Result<()> {
        let Some(links_dir) = &self.links_dir else { return Ok(()) };
        let pin = links_dir.join(format!("{}@{interface}", hook.pin_name()));
        match std::fs::remove_file(&pin) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&pin)(e)),
            _ => Ok(()),
        }
    }
}

/// The (hook, interface) pairs with a pinned link under `dir` (an agent's `--bpffs-dir`), in
/// name order: what `xlb inspect interfaces` shows, with or without a running agent.
pub fn attached_hooks(dir: &Path) -> io::Result<Vec<(Hook, String)>> {
    let entries = match std::fs::read_dir(dir.join("links")) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some((pin_name, interface)) = name.split_once('@') else { continue };
        if let Some(hook) = Hook::ALL.into_iter().find(|h| h.pin_name() == pin_name) {
            found.push((hook, interface.to_string()));
        }
    }
    found.sort();
    Ok(found)
}

fn is_defunct_link(error: &ProgramError) -> bool {
    matches!(error, ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOLINK))
}

/// Removes everything the agent made under `dir`: unpinning the links detaches the
/// programs (the agent must be stopped), unpinning the maps frees them.
pub fn cleanup(dir: &Path) -> Result<()> {
    let links_dir = dir.join("links");
    match std::fs::read_dir(&links_dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry.map_err(io_err(&links_dir))?.path();
                std::fs::remove_file(&path).map_err(io_err(&path))?;
            }
            std::fs::remove_dir(&links_dir).map_err(io_err(&links_dir))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&links_dir)(e)),
    }
    let pins = maps::ALL.into_iter().flat_map(|name| [dir.join(name), layout::staged_pin(dir, name)]);
    for path in pins {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}
