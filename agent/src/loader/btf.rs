//! A small reader for the kernel's BTF type information (`/sys/kernel/btf/vmlinux`).
//!
//! Waybill's eBPF programs never have kernel struct offsets compiled in: at start-up user space
//! looks them up here and hands them over in [`KernelOffsets`]. Only what those lookups need is
//! implemented: the raw bytes are kept as they are, parsing records where each type starts (one
//! `u32` per type id), and a name → STRUCT/UNION index is built on the first lookup. Nothing is
//! allocated per type name. Format: <https://docs.kernel.org/bpf/btf.html>.
//!
//! Only BTF in the host's byte order is read (the kernel's own BTF always is); byte-swapped data
//! is detected and rejected with [`BtfError::ByteSwapped`].

use std::{
    io,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use waybill_common::{KernelOffsets, SyscallRegs};

/// Where the running kernel exposes its own BTF.
pub const SYS_FS_VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;
const BTF_VERSION: u8 = 1;
/// Size of the version-1 header (`struct btf_header`).
const HEADER_LEN: usize = 24;
/// Size of `struct btf_type`.
const TYPE_LEN: usize = 12;
/// Size of one `struct btf_member`.
const MEMBER_LEN: usize = 12;
/// Pointer size of the kernels Waybill supports (64-bit only); BTF does not record it.
const PTR_SIZE: u32 = 8;
/// Longest typedef/qualifier chain and deepest anonymous nesting followed before the data is
/// considered corrupt (guards against cycles).
const MAX_DEPTH: usize = 64;

const KIND_VOID: u32 = 0;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_VOID => "void",
        KIND_INT => "int",
        KIND_PTR => "pointer",
        KIND_ARRAY => "array",
        KIND_STRUCT => "struct",
        KIND_UNION => "union",
        KIND_ENUM => "enum",
        KIND_FWD => "forward declaration",
        KIND_TYPEDEF => "typedef",
        KIND_VOLATILE => "volatile",
        KIND_CONST => "const",
        KIND_RESTRICT => "restrict",
        KIND_FUNC => "function",
        KIND_FUNC_PROTO => "function prototype",
        KIND_VAR => "variable",
        KIND_DATASEC => "data section",
        KIND_FLOAT => "float",
        KIND_DECL_TAG => "decl tag",
        KIND_TYPE_TAG => "type tag",
        KIND_ENUM64 => "enum64",
        _ => "unknown kind",
    }
}

/// Appended to errors that mean "this kernel's layout is not what Waybill expects".
const REPORT: &str = "this kernel is not supported yet; please report it with the output of `uname -r`";

/// Errors from reading BTF or looking members up in it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BtfError {
    #[error(
        "kernel BTF is not available ({}: {source}); Waybill needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (Linux >= 5.8 with BTF, the default on current major \
         distributions): upgrade the kernel or rebuild it with that option",
        path.display()
    )]
    NotAvailable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read kernel BTF from {}: {source}; check that this user may read it (run Waybill as root)", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "BTF data is in the opposite byte order to this host; cross-endian BTF is not supported: \
         read the BTF of the kernel Waybill runs on ({SYS_FS_VMLINUX})"
    )]
    ByteSwapped,
    #[error("not BTF data (magic {found:#06x}, expected 0xeb9f); give Waybill {SYS_FS_VMLINUX} or a raw .BTF blob")]
    BadMagic { found: u16 },
    #[error(
        "unsupported BTF version {0} (Waybill reads version 1); this kernel's BTF is newer than Waybill: upgrade Waybill"
    )]
    UnsupportedVersion(u8),
    #[error("BTF type [{id}] has unknown kind {kind}; this kernel's BTF is newer than Waybill: upgrade Waybill")]
    UnknownKind { id: u32, kind: u32 },
    #[error(
        "malformed BTF: {0}; the data is truncated or corrupt (re-read {SYS_FS_VMLINUX}; report a bug if it persists)"
    )]
    Malformed(String),
    #[error("kernel BTF has no struct {name}; {REPORT}")]
    StructNotFound { name: String },
    #[error("kernel BTF: struct {struct_name} has no member {path}; {REPORT}")]
    MemberNotFound { struct_name: String, path: String },
    #[error(
        "kernel BTF: struct {struct_name}: member {path} is a {kind}, not a struct or union, so the path cannot go through it; {REPORT}"
    )]
    NotAStruct { struct_name: String, path: String, kind: &'static str },
    #[error(
        "kernel BTF: struct {struct_name}: member {path} is a bitfield, which the probes cannot read by byte offset; {REPORT}"
    )]
    Bitfield { struct_name: String, path: String },
    #[error(
        "kernel BTF: struct {struct_name}: member {path} starts at bit {bit_offset}, not on a byte boundary; {REPORT}"
    )]
    NotByteAligned { struct_name: String, path: String, bit_offset: u32 },
    #[error("kernel BTF: struct {struct_name}: member {path} has a type of unknown size ({kind}); {REPORT}")]
    UnknownSize { struct_name: String, path: String, kind: &'static str },
    #[error("kernel BTF: struct {struct_name}: member {path} is {size} bytes, expected {expected}; {REPORT}")]
    SizeMismatch { struct_name: String, path: String, size: u32, expected: u32 },
    #[error(
        "kernel BTF has several different definitions of struct {struct_name} that disagree on \
         member {path} ({first:?} vs {second:?}); {REPORT}"
    )]
    Ambiguous { struct_name: String, path: String, first: Member, second: Member },
}

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

/// Where a member lives inside its outermost struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Byte offset from the start of the outermost struct.
    pub offset: u32,
    /// Size in bytes of the member's type (typedefs and qualifiers resolved; pointers are 8).
    pub size: u32,
}

/// Parsed BTF: the raw bytes plus the position of every type.
pub struct Btf {
    data: Vec<u8>,
    /// Absolute start of the string section in `data`.
    str_start: usize,
    /// Absolute end of the string section in `data`.
    str_end: usize,
    /// `type_pos[id]` = absolute position of type `id`'s `struct btf_type`; `[0]` (void) is unused.
    type_pos: Vec<u32>,
    /// Ids of the named STRUCT and UNION types, sorted by name; built on the first lookup.
    by_name: OnceLock<Vec<u32>>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("bytes", &self.data.len())
            .field("types", &(self.type_pos.len() - 1))
            .finish_non_exhaustive()
    }
}

/// One `struct btf_type`, decoded.
#[derive(Clone, Copy)]
struct Ty {
    /// Absolute position in the data (meaningless for void).
    pos: usize,
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// `size` for INT/ENUM/STRUCT/UNION/..., `type` for PTR/TYPEDEF/qualifiers/...
    size_or_type: u32,
}

const VOID: Ty = Ty { pos: 0, name_off: 0, kind: KIND_VOID, vlen: 0, kind_flag: false, size_or_type: 0 };

/// One `struct btf_member`, decoded.
#[derive(Clone, Copy)]
struct RawMember {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    /// 0 if not a bitfield (only encoded here when the parent has `kind_flag`).
    bitfield_size: u32,
}

/// A member found by name, with its bit offset relative to the struct searched.
#[derive(Clone, Copy)]
struct Found {
    bit_offset: u32,
    bitfield_size: u32,
    type_id: u32,
}

impl Btf {
    /// Reads the running kernel's BTF from `/sys/kernel/btf/vmlinux`.
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Self::from_file(Path::new(SYS_FS_VMLINUX))
    }

    /// Reads raw BTF (such as `/sys/kernel/btf/vmlinux`) from a file.
    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        match std::fs::read(path) {
            Ok(data) => Self::from_vec(data),
            Err(source) if source.kind() == io::ErrorKind::NotFound => {
                Err(BtfError::NotAvailable { path: path.to_owned(), source })
            }
            Err(source) => Err(BtfError::Io { path: path.to_owned(), source }),
        }
    }

    /// Parses raw BTF bytes (copies them).
    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        Self::from_vec(bytes.to_vec())
    }

    fn from_vec(data: Vec<u8>) -> Result<Btf, BtfError> {
        if data.len() < 2 {
            return Err(malformed(format!("{} bytes is too short for a BTF header", data.len())));
        }
        let magic = u16::from_ne_bytes([data[0], data[1]]);
        if magic == BTF_MAGIC.swap_bytes() {
            return Err(BtfError::ByteSwapped);
        }
        if magic != BTF_MAGIC {
            return Err(BtfError::BadMagic { found: magic });
        }
        if data.len() < HEADER_LEN {
            return Err(malformed(format!("{} bytes is too short for a BTF header", data.len())));
        }
        if data[2] != BTF_VERSION {
            return Err(BtfError::UnsupportedVersion(data[2]));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(malformed("larger than 4 GiB"));
        }
        let word = |pos: usize| u32::from_ne_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let hdr_len = word(4);
        let (type_off, type_len, str_off, str_len) = (word(8), word(12), word(16), word(20));
        if hdr_len < HEADER_LEN || hdr_len > data.len() {
            return Err(malformed(format!("header length {hdr_len} out of range")));
        }
        let section = |name: &str, off: usize, len: usize| {
            let start = hdr_len + off; // no overflow: all are < 2^32 in a usize of >= 64 bits
            match start.checked_add(len) {
                Some(end) if end <= data.len() => Ok((start, end)),
                _ => Err(malformed(format!(
                    "{name} section (offset {off}, length {len}) runs past the end of the data ({} bytes)",
                    data.len()
                ))),
            }
        };
        let (type_start, type_end) = section("type", type_off, type_len)?;
        let (str_start, str_end) = section("string", str_off, str_len)?;
        if str_len == 0 || data[str_start] != 0 || data[str_end - 1] != 0 {
            return Err(malformed("the string section must start and end with a NUL byte"));
        }

        let mut btf = Btf { data, str_start, str_end, type_pos: vec![0], by_name: OnceLock::new() };
        let mut pos = type_start;
        while pos < type_end {
            let id = btf.type_pos.len() as u32;
            if pos + TYPE_LEN > type_end {
                return Err(malformed(format!("type [{id}] is cut off at the end of the type section")));
            }
            let ty = btf.decode(pos);
            let vlen = ty.vlen as usize;
            let extra = match ty.kind {
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC
                | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                kind => return Err(BtfError::UnknownKind { id, kind }),
            };
            let next = pos + TYPE_LEN + extra;
            if next > type_end {
                return Err(malformed(format!("type [{id}] runs past the end of the type section")));
            }
            btf.check_name(ty.name_off, id)?;
            if matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
                for i in 0..ty.vlen {
                    btf.check_name(btf.raw_member(&ty, i).name_off, id)?;
                }
            }
            btf.type_pos.push(pos as u32);
            pos = next;
        }
        Ok(btf)
    }

    /// Byte offset and size of `path` (e.g. `["__sk_common", "skc_daddr"]`) inside
    /// `struct struct_name` (or `union struct_name`).
    ///
    /// Anonymous struct/union members are searched through; typedef, const, volatile, restrict
    /// and type-tag chains are skipped. Every element but the last must be a struct or union
    /// (pointers are not followed). An empty path gives the whole struct. If the kernel has
    /// several structs of that name, the ones that have the member must agree on it.
    pub fn member(&self, struct_name: &str, path: &[&str]) -> Result<Member, BtfError> {
        let mut found: Option<Member> = None;
        let mut first_err = None;
        for id in self.structs_named(struct_name) {
            match self.resolve(id, struct_name, path) {
                Ok(m) => match found {
                    Some(prev) if prev != m => {
                        return Err(BtfError::Ambiguous {
                            struct_name: struct_name.to_owned(),
                            path: path.join("."),
                            first: prev,
                            second: m,
                        });
                    }
                    _ => found = Some(m),
                },
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match (found, first_err) {
            (Some(m), _) => Ok(m),
            (None, Some(e)) => Err(e),
            (None, None) => Err(BtfError::StructNotFound { name: struct_name.to_owned() }),
        }
    }

    /// Resolves `path` inside the struct/union with type id `id`.
    fn resolve(&self, id: u32, struct_name: &str, path: &[&str]) -> Result<Member, BtfError> {
        let mut ty = self.ty(id)?;
        if path.is_empty() {
            return Ok(Member { offset: 0, size: ty.size_or_type });
        }
        let err_path = |upto: usize| path[..=upto].join(".");
        let mut bits: u32 = 0;
        for (i, name) in path.iter().enumerate() {
            let f = self
                .find_member(&ty, name.as_bytes(), 0)?
                .ok_or_else(|| BtfError::MemberNotFound { struct_name: struct_name.to_owned(), path: err_path(i) })?;
            bits = bits.checked_add(f.bit_offset).ok_or_else(|| malformed("member offset overflows"))?;
            let mty = self.strip(f.type_id)?;
            if i + 1 < path.len() {
                if !matches!(mty.kind, KIND_STRUCT | KIND_UNION) {
                    return Err(BtfError::NotAStruct {
                        struct_name: struct_name.to_owned(),
                        path: err_path(i),
                        kind: kind_name(mty.kind),
                    });
                }
                ty = mty;
                continue;
            }
            if f.bitfield_size != 0 || self.is_int_bitfield(&mty) {
                return Err(BtfError::Bitfield { struct_name: struct_name.to_owned(), path: err_path(i) });
            }
            if !bits.is_multiple_of(8) {
                return Err(BtfError::NotByteAligned {
                    struct_name: struct_name.to_owned(),
                    path: err_path(i),
                    bit_offset: bits,
                });
            }
            let size = self.size_of(f.type_id, 0)?.ok_or_else(|| BtfError::UnknownSize {
                struct_name: struct_name.to_owned(),
                path: err_path(i),
                kind: kind_name(mty.kind),
            })?;
            return Ok(Member { offset: bits / 8, size });
        }
        unreachable!("the loop returns on the last path element")
    }

    /// Finds `name` among the members of struct/union `ty`, descending into anonymous
    /// struct/union members (in declaration order, as C requires names to be unique).
    fn find_member(&self, ty: &Ty, name: &[u8], depth: usize) -> Result<Option<Found>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed("anonymous members nested too deeply (a cycle?)"));
        }
        for i in 0..ty.vlen {
            let m = self.raw_member(ty, i);
            let mname = self.str_at(m.name_off);
            if mname == name {
                return Ok(Some(Found {
                    bit_offset: m.bit_offset,
                    bitfield_size: m.bitfield_size,
                    type_id: m.type_id,
                }));
            }
            if !mname.is_empty() {
                continue;
            }
            let inner = self.strip(m.type_id)?;
            if !matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                continue;
            }
            if let Some(f) = self.find_member(&inner, name, depth + 1)? {
                let bit_offset =
                    m.bit_offset.checked_add(f.bit_offset).ok_or_else(|| malformed("member offset overflows"))?;
                return Ok(Some(Found { bit_offset, ..f }));
            }
        }
        Ok(None)
    }

    /// Size in bytes of type `id`, or `None` for types without one (void, functions, forward
    /// declarations).
    fn size_of(&self, id: u32, depth: usize) -> Result<Option<u32>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed("array types nested too deeply (a cycle?)"));
        }
        let ty = self.strip(id)?;
        Ok(match ty.kind {
            KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION | KIND_FLOAT | KIND_DATASEC => {
                Some(ty.size_or_type)
            }
            KIND_PTR => Some(PTR_SIZE),
            KIND_ARRAY => {
                let elem = self.word(ty.pos + TYPE_LEN);
                let nelems = self.word(ty.pos + TYPE_LEN + 8);
                match self.size_of(elem, depth + 1)? {
                    Some(size) => Some(size.checked_mul(nelems).ok_or_else(|| malformed("array size overflows"))?),
                    None => None,
                }
            }
            _ => None,
        })
    }

    /// An INT whose encoding says it uses fewer bits than its size or starts at a bit offset:
    /// the pre-`kind_flag` way of describing a bitfield member.
    fn is_int_bitfield(&self, ty: &Ty) -> bool {
        if ty.kind != KIND_INT {
            return false;
        }
        let enc = self.word(ty.pos + TYPE_LEN);
        let (bits, offset) = (enc & 0xff, (enc >> 16) & 0xff);
        offset != 0 || bits != ty.size_or_type.saturating_mul(8)
    }

    /// Follows typedef / const / volatile / restrict / type-tag chains to the real type.
    fn strip(&self, mut id: u32) -> Result<Ty, BtfError> {
        for _ in 0..MAX_DEPTH {
            let ty = self.ty(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_CONST | KIND_VOLATILE | KIND_RESTRICT | KIND_TYPE_TAG => id = ty.size_or_type,
                _ => return Ok(ty),
            }
        }
        Err(malformed(format!("typedef/qualifier chain through type [{id}] is too long (a cycle?)")))
    }

    /// Ids of the STRUCT/UNION types called `name`.
    fn structs_named(&self, name: &str) -> impl Iterator<Item = u32> {
        let index = self.by_name.get_or_init(|| {
            let mut named: Vec<(&[u8], u32)> = (1..self.type_pos.len() as u32)
                .filter_map(|id| {
                    let ty = self.decode(self.type_pos[id as usize] as usize);
                    (matches!(ty.kind, KIND_STRUCT | KIND_UNION) && ty.name_off != 0)
                        .then(|| (self.str_at(ty.name_off), id))
                })
                .collect();
            named.sort_unstable();
            named.into_iter().map(|(_, id)| id).collect()
        });
        let name = name.as_bytes();
        let type_name = |id: u32| self.str_at(self.decode(self.type_pos[id as usize] as usize).name_off);
        let start = index.partition_point(|&id| type_name(id) < name);
        index[start..].iter().copied().take_while(move |&id| type_name(id) == name)
    }

    fn ty(&self, id: u32) -> Result<Ty, BtfError> {
        match id {
            0 => Ok(VOID),
            _ => match self.type_pos.get(id as usize) {
                Some(&pos) => Ok(self.decode(pos as usize)),
                None => {
                    Err(malformed(format!("reference to type [{id}], but there are only {}", self.type_pos.len() - 1)))
                }
            },
        }
    }

    /// Decodes the `struct btf_type` at `pos` (bounds checked at parse time).
    fn decode(&self, pos: usize) -> Ty {
        let info = self.word(pos + 4);
        Ty {
            pos,
            name_off: self.word(pos),
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kind_flag: info >> 31 == 1,
            size_or_type: self.word(pos + 8),
        }
    }

    /// Member `i` of struct/union `ty` (bounds checked at parse time).
    fn raw_member(&self, ty: &Ty, i: u32) -> RawMember {
        let pos = ty.pos + TYPE_LEN + i as usize * MEMBER_LEN;
        let offset = self.word(pos + 8);
        let (bit_offset, bitfield_size) = if ty.kind_flag { (offset & 0xff_ffff, offset >> 24) } else { (offset, 0) };
        RawMember { name_off: self.word(pos), type_id: self.word(pos + 4), bit_offset, bitfield_size }
    }

    fn word(&self, pos: usize) -> u32 {
        u32::from_ne_bytes(self.data[pos..pos + 4].try_into().expect("4 bytes"))
    }

    fn check_name(&self, off: u32, id: u32) -> Result<(), BtfError> {
        if (off as usize) < self.str_end - self.str_start {
            Ok(())
        } else {
            Err(malformed(format!("type [{id}] has a name offset {off} outside the string section")))
        }
    }

    /// The NUL-terminated string at `off` in the string section (offsets checked at parse time;
    /// the section ends with a NUL).
    fn str_at(&self, off: u32) -> &[u8] {
        let s = &self.data[self.str_start + off as usize..self.str_end];
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }
}

/// Offset of `path` in `struct_name`, checking that the member is `size` bytes.
fn sized(btf: &Btf, struct_name: &str, path: &[&str], size: u32) -> Result<u32, BtfError> {
    let m = btf.member(struct_name, path)?;
    if m.size != size {
        return Err(BtfError::SizeMismatch {
            struct_name: struct_name.to_owned(),
            path: path.join("."),
            size: m.size,
            expected: size,
        });
    }
    Ok(m.offset)
}

/// Fills [`KernelOffsets`] from BTF, checking each member's size. The IPv6 addresses are 0 when
/// the kernel has no IPv6 (`CONFIG_IPV6=n`); the probes then skip AF_INET6 sockets.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let sk = |member: &str, size| sized(btf, "sock", &["__sk_common", member], size);
    let sk_v6 = |member: &str| match sk(member, 16) {
        Err(BtfError::MemberNotFound { .. }) => Ok(0),
        other => other,
    };
    Ok(KernelOffsets {
        task_files: sized(btf, "task_struct", &["files"], PTR_SIZE)?,
        files_fdt: sized(btf, "files_struct", &["fdt"], PTR_SIZE)?,
        fdt_max_fds: sized(btf, "fdtable", &["max_fds"], 4)?,
        fdt_fd: sized(btf, "fdtable", &["fd"], PTR_SIZE)?,
        file_f_inode: sized(btf, "file", &["f_inode"], PTR_SIZE)?,
        file_private_data: sized(btf, "file", &["private_data"], PTR_SIZE)?,
        inode_i_mode: sized(btf, "inode", &["i_mode"], 2)?,
        socket_type: sized(btf, "socket", &["type"], 2)?,
        socket_sk: sized(btf, "socket", &["sk"], PTR_SIZE)?,
        skc_family: sk("skc_family", 2)?,
        skc_daddr: sk("skc_daddr", 4)?,
        skc_rcv_saddr: sk("skc_rcv_saddr", 4)?,
        skc_dport: sk("skc_dport", 2)?,
        skc_num: sk("skc_num", 2)?,
        skc_v6_daddr: sk_v6("skc_v6_daddr")?,
        skc_v6_rcv_saddr: sk_v6("skc_v6_rcv_saddr")?,
        valid: 1,
    })
}

/// Where this architecture's `struct pt_regs` keeps the syscall number, the first three
/// arguments and the 32-bit-mode marker, from BTF (the data-syscall program reads them at
/// `sys_exit`; see ebpf-probes/src/syscalls.rs).
#[cfg(target_arch = "x86_64")]
pub fn syscall_regs(btf: &Btf) -> Result<SyscallRegs, BtfError> {
    let r = |name: &str| sized(btf, "pt_regs", &[name], 8);
    Ok(SyscallRegs {
        nr: r("orig_ax")?,
        nr_is_u32: 0,
        arg: [r("di")?, r("si")?, r("dx")?],
        // __USER32_CS: the task runs 32-bit code and makes ia32 syscalls (other numbers). `cs` is
        // 8 bytes before 6.9 and a 2-byte member (FRED layout) after; the low 16 bits are read.
        compat_off: btf.member("pt_regs", &["cs"])?.offset,
        compat_mask: 0xffff,
        compat_value: 0x23,
        valid: 1,
        _pad: 0,
    })
}

/// arm64: `syscallno` is an `s32`, the first argument survives in `orig_x0` (`regs[0]` holds the
/// return value at exit), and `pstate` has `PSR_MODE32_BIT` for AArch32 tasks.
#[cfg(target_arch = "aarch64")]
pub fn syscall_regs(btf: &Btf) -> Result<SyscallRegs, BtfError> {
    let regs = btf.member("pt_regs", &["regs"])?.offset;
    Ok(SyscallRegs {
        nr: sized(btf, "pt_regs", &["syscallno"], 4)?,
        nr_is_u32: 0xffff_ffff,
        arg: [sized(btf, "pt_regs", &["orig_x0"], 8)?, regs + 8, regs + 16],
        compat_off: sized(btf, "pt_regs", &["pstate"], 8)?,
        compat_mask: 0x10,
        compat_value: 0x10,
        valid: 1,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, process::Command, time::Instant};

    use super::*;

    /// Builds BTF blobs in host byte order for tests.
    struct Builder {
        types: Vec<u8>,
        strs: Vec<u8>,
        next_id: u32,
    }

    /// (name, type id, bit offset, bitfield size); bitfield sizes need a `kind_flag` struct.
    type M<'a> = (&'a str, u32, u32, u32);

    impl Builder {
        fn new() -> Self {
            Builder { types: Vec::new(), strs: vec![0], next_id: 1 }
        }

        fn name(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strs.len() as u32;
            self.strs.extend_from_slice(name.as_bytes());
            self.strs.push(0);
            off
        }

        fn raw(&mut self, name: &str, kind: u32, vlen: u32, kind_flag: bool, size_or_type: u32, extra: &[u32]) -> u32 {
            let name_off = self.name(name);
            let info = (u32::from(kind_flag) << 31) | (kind << 24) | vlen;
            for w in [name_off, info, size_or_type].iter().chain(extra) {
                self.types.extend_from_slice(&w.to_ne_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.raw(name, KIND_INT, 0, false, size, &[size * 8])
        }
        /// Old-style bitfield type: an INT using `bits` of `size` bytes.
        fn int_bits(&mut self, name: &str, size: u32, bits: u32) -> u32 {
            self.raw(name, KIND_INT, 0, false, size, &[bits])
        }
        fn ptr(&mut self, to: u32) -> u32 {
            self.raw("", KIND_PTR, 0, false, to, &[])
        }
        fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.raw(name, KIND_TYPEDEF, 0, false, to, &[])
        }
        fn modifier(&mut self, kind: u32, to: u32) -> u32 {
            self.raw("", kind, 0, false, to, &[])
        }
        fn type_tag(&mut self, tag: &str, to: u32) -> u32 {
            self.raw(tag, KIND_TYPE_TAG, 0, false, to, &[])
        }
        fn fwd(&mut self, name: &str) -> u32 {
            self.raw(name, KIND_FWD, 0, false, 0, &[])
        }
        fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            self.raw("", KIND_ARRAY, 0, false, 0, &[elem, index, n])
        }
        fn composite(&mut self, kind: u32, name: &str, size: u32, members: &[M]) -> u32 {
            let kind_flag = members.iter().any(|m| m.3 != 0);
            let mut extra = Vec::new();
            for &(mname, ty, bits, bf) in members {
                let off = self.name(mname);
                extra.extend([off, ty, if kind_flag { (bf << 24) | bits } else { bits }]);
            }
            self.raw(name, kind, members.len() as u32, kind_flag, size, &extra)
        }
        fn strukt(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
            self.composite(KIND_STRUCT, name, size, members)
        }
        fn union(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
            self.composite(KIND_UNION, name, size, members)
        }
        /// One of every kind not otherwise used, to check their trailing data is skipped right.
        fn other_kinds(&mut self, int: u32) {
            let a = self.name("A");
            let b = self.name("B");
            self.raw("e", KIND_ENUM, 2, false, 4, &[a, 0, b, 1]);
            self.raw("e64", KIND_ENUM64, 1, false, 8, &[a, 1, 2]);
            let p = self.name("p");
            let proto = self.raw("", KIND_FUNC_PROTO, 2, false, int, &[p, int, 0, int]);
            self.raw("f", KIND_FUNC, 0, false, proto, &[]);
            let var = self.raw("v", KIND_VAR, 0, false, int, &[1]);
            self.raw(".data", KIND_DATASEC, 1, false, 4, &[var, 0, 4]);
            self.raw("tag", KIND_DECL_TAG, 0, false, var, &[u32::MAX]);
            self.raw("double", KIND_FLOAT, 0, false, 8, &[]);
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_ne_bytes());
            out.extend_from_slice(&[BTF_VERSION, 0]);
            let tl = self.types.len() as u32;
            for w in [HEADER_LEN as u32, 0, tl, tl, self.strs.len() as u32] {
                out.extend_from_slice(&w.to_ne_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strs);
            out
        }
    }

    /// A struct with an anonymous union (containing an anonymous struct), a typedef chain, a
    /// bitfield, a const-qualified pointer, a type-tagged pointer, arrays, and more.
    fn fixture() -> Vec<u8> {
        let mut b = Builder::new();
        let u8_ = b.int("unsigned char", 1);
        let u16_ = b.int("unsigned short", 2);
        let u32_ = b.int("unsigned int", 4);
        let u64_ = b.int("long unsigned int", 8);
        let char_ = b.int("char", 1);
        b.other_kinds(u32_);
        // const volatile umode_t, umode_t -> __u16 -> unsigned short
        let td1 = b.typedef("__u16", u16_);
        let td2 = b.typedef("umode_t", td1);
        let vol = b.modifier(KIND_VOLATILE, td2);
        let cv = b.modifier(KIND_CONST, vol);
        let arr4 = b.array(u32_, u32_, 4);
        let inner = b.strukt("inner", 24, &[("a", u64_, 0, 0), ("arr", arr4, 64, 0)]);
        let inner_t = b.typedef("inner_t", inner);
        let p_inner = b.ptr(inner);
        let c_ptr = b.modifier(KIND_CONST, p_inner); // struct inner *const
        let tagged = b.type_tag("rcu", inner);
        let p_tagged = b.ptr(tagged); // struct inner __rcu *
        let rp = b.modifier(KIND_RESTRICT, p_tagged);
        let comm = b.array(char_, u32_, 16);
        let fwd = b.fwd("opaque");
        let p_fwd = b.ptr(fwd);
        let anon_s = b.strukt("", 4, &[("lo", u16_, 0, 0), ("hi", u16_, 16, 0)]);
        let anon_u = b.union("", 4, &[("x", u32_, 0, 0), ("", anon_s, 0, 0)]);
        let grid_row = b.array(u16_, u32_, 3);
        let grid = b.array(grid_row, u32_, 2);
        b.strukt(
            "outer",
            128,
            &[
                ("flags", u32_, 0, 0),
                ("", anon_u, 32, 0),
                ("mode", cv, 64, 0),
                ("bits", u8_, 80, 3),
                ("odd", u8_, 84, 0),
                ("ptr", c_ptr, 128, 0),
                ("inner", inner_t, 192, 0),
                ("rp", rp, 384, 0),
                ("comm", comm, 448, 0),
                ("fwdp", p_fwd, 576, 0),
                ("grid", grid, 640, 0),
                ("opaque", fwd, 768, 0),
            ],
        );
        let old_bits = b.int_bits("unsigned int", 4, 3);
        b.strukt("old", 8, &[("a", u32_, 0, 0), ("b", old_bits, 32, 0)]);
        b.union("un", 8, &[("a", u32_, 0, 0), ("b", u64_, 0, 0)]);
        // Same name twice, disagreeing.
        b.strukt("dup", 8, &[("x", u32_, 0, 0)]);
        b.strukt("dup", 8, &[("x", u32_, 32, 0)]);
        // Same name twice, different members, agreeing where both have them.
        b.strukt("dup2", 8, &[("x", u32_, 0, 0)]);
        b.strukt("dup2", 8, &[("x", u32_, 0, 0), ("y", u32_, 32, 0)]);
        b.build()
    }

    fn m(offset: u32, size: u32) -> Member {
        Member { offset, size }
    }

    #[test]
    fn member_offsets() {
        let btf = Btf::parse(&fixture()).unwrap();
        let get = |s: &str, p: &[&str]| btf.member(s, p).unwrap_or_else(|e| panic!("{s} {p:?}: {e}"));
        assert_eq!(get("outer", &["flags"]), m(0, 4));
        // anonymous union, and an anonymous struct inside it
        assert_eq!(get("outer", &["x"]), m(4, 4));
        assert_eq!(get("outer", &["lo"]), m(4, 2));
        assert_eq!(get("outer", &["hi"]), m(6, 2));
        // const volatile typedef typedef unsigned short
        assert_eq!(get("outer", &["mode"]), m(8, 2));
        // pointers: const, restrict + type tag, to a forward declaration
        assert_eq!(get("outer", &["ptr"]), m(16, 8));
        assert_eq!(get("outer", &["rp"]), m(48, 8));
        assert_eq!(get("outer", &["fwdp"]), m(72, 8));
        // a typedef'd struct member and paths through it
        assert_eq!(get("outer", &["inner"]), m(24, 24));
        assert_eq!(get("outer", &["inner", "a"]), m(24, 8));
        assert_eq!(get("outer", &["inner", "arr"]), m(32, 16));
        assert_eq!(get("outer", &["comm"]), m(56, 16));
        assert_eq!(get("outer", &["grid"]), m(80, 12));
        assert_eq!(get("outer", &[]), m(0, 128));
        assert_eq!(get("inner", &["arr"]), m(8, 16));
        assert_eq!(get("old", &["a"]), m(0, 4));
        assert_eq!(get("un", &["b"]), m(0, 8));
        assert_eq!(get("dup2", &["x"]), m(0, 4));
        assert_eq!(get("dup2", &["y"]), m(4, 4));
        assert_eq!(format!("{btf:?}"), format!("Btf {{ bytes: {}, types: 40, .. }}", fixture().len()));
    }

    #[test]
    fn member_errors() {
        let btf = Btf::parse(&fixture()).unwrap();
        let err = |s: &str, p: &[&str]| btf.member(s, p).unwrap_err();

        let e = err("missing", &["x"]);
        assert!(matches!(&e, BtfError::StructNotFound { name } if name == "missing"), "{e:?}");
        assert!(e.to_string().contains("struct missing"), "{e}");
        // "opaque" exists only as a forward declaration
        assert!(matches!(err("opaque", &["x"]), BtfError::StructNotFound { .. }));

        let e = err("outer", &["nope"]);
        assert!(
            matches!(&e, BtfError::MemberNotFound { struct_name, path } if struct_name == "outer" && path == "nope")
        );
        assert!(e.to_string().contains("struct outer has no member nope"), "{e}");
        assert!(e.to_string().contains("uname -r"), "{e}");
        let e = err("outer", &["inner", "nope"]);
        assert!(matches!(&e, BtfError::MemberNotFound { path, .. } if path == "inner.nope"), "{e:?}");
        assert!(e.to_string().contains("inner.nope"), "{e}");

        let e = err("outer", &["bits"]);
        assert!(matches!(&e, BtfError::Bitfield { struct_name, path } if struct_name == "outer" && path == "bits"));
        let e = err("old", &["b"]);
        assert!(matches!(&e, BtfError::Bitfield { path, .. } if path == "b"), "{e:?}");

        let e = err("outer", &["odd"]);
        assert!(matches!(&e, BtfError::NotByteAligned { path, bit_offset: 84, .. } if path == "odd"), "{e:?}");

        let e = err("outer", &["flags", "x"]);
        assert!(matches!(&e, BtfError::NotAStruct { path, kind: "int", .. } if path == "flags"), "{e:?}");
        let e = err("outer", &["ptr", "a"]);
        assert!(matches!(&e, BtfError::NotAStruct { path, kind: "pointer", .. } if path == "ptr"), "{e:?}");

        let e = err("outer", &["opaque"]);
        assert!(matches!(&e, BtfError::UnknownSize { path, .. } if path == "opaque"), "{e:?}");

        let e = err("dup", &["x"]);
        assert!(
            matches!(&e, BtfError::Ambiguous { first, second, .. } if *first == m(0, 4) && *second == m(4, 4)),
            "{e:?}"
        );
    }

    #[test]
    fn parse_errors() {
        let good = fixture();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = good.clone();
            f(&mut v);
            Btf::parse(&v).unwrap_err()
        };
        let set_word = |v: &mut Vec<u8>, pos: usize, w: u32| v[pos..pos + 4].copy_from_slice(&w.to_ne_bytes());

        let e = with(&|v| v.swap(0, 1));
        assert!(matches!(e, BtfError::ByteSwapped), "{e:?}");
        assert!(e.to_string().contains("byte order"), "{e}");
        assert!(matches!(with(&|v| v[0] = 0), BtfError::BadMagic { .. }));
        assert!(matches!(Btf::parse(b"ELF\x7f"), Err(BtfError::BadMagic { .. })));
        assert!(matches!(Btf::parse(&[]), Err(BtfError::Malformed(_))));
        assert!(matches!(with(&|v| v.truncate(10)), BtfError::Malformed(_)));
        assert!(matches!(with(&|v| v[2] = 2), BtfError::UnsupportedVersion(2)));
        assert!(matches!(with(&|v| set_word(v, 4, 8)), BtfError::Malformed(_)));
        // string section longer than the data
        let e = with(&|v| set_word(v, 20, 1 << 20));
        assert!(matches!(&e, BtfError::Malformed(msg) if msg.contains("string section")), "{e:?}");
        // data cut short
        assert!(matches!(with(&|v| v.truncate(v.len() - 1)), BtfError::Malformed(_)));
        // the type section ends inside a type (a gap before the string section is allowed)
        let e = with(&|v| {
            let tl = u32::from_ne_bytes(v[12..16].try_into().unwrap());
            set_word(v, 12, tl - 4);
        });
        assert!(
            matches!(&e, BtfError::Malformed(msg) if msg.contains("runs past") || msg.contains("cut off")),
            "{e:?}"
        );
        // an unknown kind in the first type
        let e = with(&|v| set_word(v, HEADER_LEN + 4, 25 << 24));
        assert!(matches!(e, BtfError::UnknownKind { id: 1, kind: 25 }), "{e:?}");
        assert!(e.to_string().contains("upgrade Waybill"), "{e}");
        // a name offset outside the string section
        let e = with(&|v| set_word(v, HEADER_LEN, 1 << 20));
        assert!(matches!(&e, BtfError::Malformed(msg) if msg.contains("name offset")), "{e:?}");

        // a dangling type reference only fails the lookup that follows it
        let mut b = Builder::new();
        b.strukt("s", 4, &[("a", 99, 0, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert!(matches!(btf.member("s", &["a"]), Err(BtfError::Malformed(msg)) if msg.contains("[99]")));
        // a typedef cycle
        let mut b = Builder::new();
        b.typedef("loop", 1);
        b.strukt("s", 4, &[("a", 1, 0, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert!(matches!(btf.member("s", &["a"]), Err(BtfError::Malformed(msg)) if msg.contains("cycle")));
    }

    #[test]
    fn missing_file_is_not_available() {
        let e = Btf::from_file(Path::new("/nonexistent/waybill/vmlinux")).unwrap_err();
        assert!(matches!(e, BtfError::NotAvailable { .. }), "{e:?}");
        assert!(e.to_string().contains("CONFIG_DEBUG_INFO_BTF=y"), "{e}");
        assert!(e.to_string().contains("5.8"), "{e}");
    }

    /// A miniature kernel: the members `kernel_offsets` reads, laid out like Linux 6.x.
    fn fake_kernel(ipv6: bool, i_mode: u32) -> Vec<u8> {
        let mut b = Builder::new();
        let short = b.int("short int", 2);
        let u16_ = b.int("short unsigned int", 2);
        let u32_ = b.int("unsigned int", 4);
        let u8_ = b.int("unsigned char", 1);
        let void_ptr = b.ptr(0);
        let be16 = b.typedef("__be16", u16_);
        let be32 = b.typedef("__be32", u32_);
        let umode = b.typedef("umode_t", u16_);
        let imode_ty = if i_mode == 4 { u32_ } else { umode };
        let fwd_files = b.fwd("files_struct");
        let p_files = b.ptr(fwd_files);
        b.strukt("task_struct", 4096, &[("state", u32_, 0, 0), ("files", p_files, 8 * 1824, 0)]);
        let fdtable_fwd = b.fwd("fdtable");
        let tag = b.type_tag("rcu", fdtable_fwd);
        let p_fdt = b.ptr(tag);
        b.strukt("files_struct", 64, &[("count", u32_, 0, 0), ("fdt", p_fdt, 256, 0)]);
        let pp = b.ptr(void_ptr);
        b.strukt("fdtable", 56, &[("max_fds", u32_, 0, 0), ("fd", pp, 64, 0)]);
        let anon = b.union("", 8, &[("f_inode", void_ptr, 0, 0), ("x", u32_, 0, 0)]);
        b.strukt("file", 256, &[("", anon, 256, 0), ("private_data", void_ptr, 192, 0)]);
        b.strukt("inode", 512, &[("i_mode", imode_ty, 0, 0)]);
        b.strukt("socket", 128, &[("state", u32_, 0, 0), ("type", short, 32, 0), ("sk", void_ptr, 192, 0)]);
        let addrs = b.strukt("", 8, &[("skc_daddr", be32, 0, 0), ("skc_rcv_saddr", be32, 32, 0)]);
        let addrpair = b.union("", 8, &[("skc_addrpair", u32_, 0, 0), ("", addrs, 0, 0)]);
        let ports = b.strukt("", 4, &[("skc_dport", be16, 0, 0), ("skc_num", u16_, 16, 0)]);
        let portpair = b.union("", 4, &[("skc_portpair", u32_, 0, 0), ("", ports, 0, 0)]);
        let in6 = b.strukt("in6_addr", 16, &[]);
        let mut members =
            vec![("", addrpair, 0, 0), ("", portpair, 96, 0), ("skc_family", u16_, 128, 0), ("skc_reuse", u8_, 152, 4)];
        if ipv6 {
            members.extend([("skc_v6_daddr", in6, 448, 0), ("skc_v6_rcv_saddr", in6, 576, 0)]);
        }
        let common = b.strukt("sock_common", 136, &members);
        b.strukt("sock", 1024, &[("__sk_common", common, 0, 0)]);
        b.build()
    }

    #[test]
    fn kernel_offsets_from_fake_kernel() {
        let want = KernelOffsets {
            task_files: 1824,
            files_fdt: 32,
            fdt_max_fds: 0,
            fdt_fd: 8,
            file_f_inode: 32,
            file_private_data: 24,
            inode_i_mode: 0,
            socket_type: 4,
            socket_sk: 24,
            skc_family: 16,
            skc_daddr: 0,
            skc_rcv_saddr: 4,
            skc_dport: 12,
            skc_num: 14,
            skc_v6_daddr: 56,
            skc_v6_rcv_saddr: 72,
            valid: 1,
        };
        let btf = Btf::parse(&fake_kernel(true, 2)).unwrap();
        assert_eq!(kernel_offsets(&btf).unwrap(), want);

        let btf = Btf::parse(&fake_kernel(false, 2)).unwrap();
        let no_v6 = KernelOffsets { skc_v6_daddr: 0, skc_v6_rcv_saddr: 0, ..want };
        assert_eq!(kernel_offsets(&btf).unwrap(), no_v6);

        let btf = Btf::parse(&fake_kernel(true, 4)).unwrap();
        let e = kernel_offsets(&btf).unwrap_err();
        assert!(
            matches!(&e, BtfError::SizeMismatch { struct_name, path, size: 4, expected: 2 }
                if struct_name == "inode" && path == "i_mode"),
            "{e:?}"
        );
        assert!(e.to_string().contains("inode: member i_mode is 4 bytes, expected 2"), "{e}");
    }

    fn real_btf() -> Option<Btf> {
        if !Path::new(SYS_FS_VMLINUX).exists() {
            eprintln!("note: {SYS_FS_VMLINUX} is missing, skipping the real-kernel BTF test");
            return None;
        }
        Some(Btf::from_sys_fs().expect("parse the running kernel's BTF"))
    }

    /// The running kernel's `pt_regs` agrees with the ptrace ABI (`user_regs_struct`, the same
    /// register order): an independent source for the offsets the data program reads at exit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn real_syscall_regs_match_ptrace_abi() {
        use std::mem::offset_of;
        let Some(btf) = real_btf() else { return };
        let r = syscall_regs(&btf).unwrap();
        let u = |o: usize| o as u32;
        assert_eq!(r.nr, u(offset_of!(libc::user_regs_struct, orig_rax)));
        assert_eq!(r.arg[0], u(offset_of!(libc::user_regs_struct, rdi)));
        assert_eq!(r.arg[1], u(offset_of!(libc::user_regs_struct, rsi)));
        assert_eq!(r.arg[2], u(offset_of!(libc::user_regs_struct, rdx)));
        assert_eq!(r.compat_off, u(offset_of!(libc::user_regs_struct, cs)));
        assert_eq!((r.valid, r.nr_is_u32), (1, 0));
    }

    #[test]
    fn real_kernel_offsets() {
        let Some(btf) = real_btf() else { return };
        let t = Instant::now();
        let offs = kernel_offsets(&btf).unwrap();
        eprintln!("kernel offsets in {:?}: {offs:?}", t.elapsed());
        assert_eq!(offs.valid, 1);
        // Sanity only (the exact values are cross-checked against bpftool below).
        let m = |s: &str, p: &[&str]| btf.member(s, p).unwrap();
        assert!(offs.task_files + 8 <= m("task_struct", &[]).size);
        assert!(offs.skc_num + 2 <= m("sock_common", &[]).size);
        assert_ne!(offs.skc_daddr, offs.skc_rcv_saddr);
        assert_ne!(offs.file_f_inode, offs.file_private_data);
    }

    /// One STRUCT/UNION of `bpftool btf dump ... format raw`.
    struct RawComposite {
        kind: String,
        name: String,
        /// (name, type id, bit offset, bitfield size)
        members: Vec<(String, u32, u32, u32)>,
    }

    /// Parses the STRUCT, UNION, TYPEDEF and qualifier lines of bpftool's raw dump.
    fn bpftool_dump() -> Option<(HashMap<u32, RawComposite>, HashMap<u32, u32>)> {
        let out = match Command::new("bpftool").args(["btf", "dump", "file", SYS_FS_VMLINUX, "format", "raw"]).output()
        {
            Ok(out) if out.status.success() => out.stdout,
            Ok(out) => panic!("bpftool failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => {
                eprintln!("note: bpftool not runnable ({e}), skipping the bpftool cross-check");
                return None;
            }
        };
        let (mut composites, mut aliases) = (HashMap::new(), HashMap::new());
        let mut current: Option<u32> = None;
        let field = |line: &str, key: &str| -> Option<u32> {
            line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(|v| v.parse().unwrap())
        };
        for line in String::from_utf8(out).unwrap().lines() {
            if let Some(rest) = line.strip_prefix('[') {
                current = None;
                let (id, rest) = rest.split_once("] ").unwrap();
                let id: u32 = id.parse().unwrap();
                let (kind, rest) = rest.split_once(' ').unwrap();
                let name = rest.split('\'').nth(1).unwrap().to_owned();
                match kind {
                    "STRUCT" | "UNION" => {
                        composites.insert(id, RawComposite { kind: kind.to_owned(), name, members: Vec::new() });
                        current = Some(id);
                    }
                    "TYPEDEF" | "CONST" | "VOLATILE" | "RESTRICT" | "TYPE_TAG" => {
                        aliases.insert(id, field(rest, "type_id=").unwrap());
                    }
                    _ => {}
                }
            } else if let (Some(id), Some(rest)) = (current, line.strip_prefix('\t')) {
                let name = rest.split('\'').nth(1).unwrap().to_owned();
                let ty = field(rest, "type_id=").unwrap();
                let bits = field(rest, "bits_offset=").unwrap();
                let bf = field(rest, "bitfield_size=").unwrap_or(0);
                composites.get_mut(&id).unwrap().members.push((name, ty, bits, bf));
            }
        }
        Some((composites, aliases))
    }

    /// Bit offset of `path` in composite `id`, descending into anonymous members (bpftool data).
    fn bpftool_bits(
        c: &HashMap<u32, RawComposite>,
        aliases: &HashMap<u32, u32>,
        id: u32,
        path: &[&str],
    ) -> Option<u32> {
        let strip = |mut t: u32| {
            while let Some(&n) = aliases.get(&t) {
                t = n;
            }
            t
        };
        fn find(c: &HashMap<u32, RawComposite>, strip: &dyn Fn(u32) -> u32, id: u32, name: &str) -> Option<(u32, u32)> {
            for (mname, ty, bits, _) in &c.get(&id)?.members {
                if mname == name {
                    return Some((*bits, strip(*ty)));
                }
                let inner = (mname == "(anon)").then(|| find(c, strip, strip(*ty), name));
                if let Some((b, t)) = inner.flatten() {
                    return Some((bits + b, t));
                }
            }
            None
        }
        let (mut total, mut cur) = (0, id);
        for name in path {
            let (bits, ty) = find(c, &strip, cur, name)?;
            total += bits;
            cur = ty;
        }
        Some(total)
    }

    #[test]
    fn real_vmlinux_matches_bpftool() {
        let Some(btf) = real_btf() else { return };
        let Some((composites, aliases)) = bpftool_dump() else {
            return;
        };
        let struct_id = |name: &str| {
            let ids: Vec<u32> =
                composites.iter().filter(|(_, c)| c.kind == "STRUCT" && c.name == name).map(|(&id, _)| id).collect();
            assert_eq!(ids.len(), 1, "struct {name}");
            ids[0]
        };
        // The members the probes use, including paths through anonymous unions.
        let offs = kernel_offsets(&btf).unwrap();
        let checks: [(&str, &[&str], u32); 8] = [
            ("task_struct", &["files"], offs.task_files),
            ("fdtable", &["fd"], offs.fdt_fd),
            ("file", &["private_data"], offs.file_private_data),
            ("socket", &["sk"], offs.socket_sk),
            ("sock", &["__sk_common", "skc_daddr"], offs.skc_daddr),
            ("sock", &["__sk_common", "skc_dport"], offs.skc_dport),
            ("sock", &["__sk_common", "skc_num"], offs.skc_num),
            ("sock", &["__sk_common", "skc_v6_daddr"], offs.skc_v6_daddr),
        ];
        for (s, path, ours) in checks {
            let bits = bpftool_bits(&composites, &aliases, struct_id(s), path).unwrap();
            assert_eq!(bits % 8, 0);
            assert_eq!(ours, bits / 8, "{s}.{}", path.join("."));
            eprintln!("{s}.{} = {ours} (bpftool: bit {bits})", path.join("."));
        }

        // Every byte-aligned, non-bitfield, named top-level member of every uniquely named struct.
        let mut count_by_name: HashMap<&str, u32> = HashMap::new();
        for c in composites.values().filter(|c| c.kind == "STRUCT") {
            *count_by_name.entry(&c.name).or_default() += 1;
        }
        let mut checked = 0;
        for c in composites.values() {
            if c.kind != "STRUCT" || c.name == "(anon)" || count_by_name[c.name.as_str()] != 1 {
                continue;
            }
            for (mname, _, bits, bf) in &c.members {
                if mname == "(anon)" || *bf != 0 || bits % 8 != 0 {
                    continue;
                }
                let ours = btf.member(&c.name, &[mname]).unwrap_or_else(|e| panic!("{}.{mname}: {e}", c.name));
                assert_eq!(ours.offset, bits / 8, "{}.{mname}", c.name);
                checked += 1;
            }
        }
        eprintln!("cross-checked {checked} members against bpftool");
        assert!(checked > 1000, "only {checked} members checked");
    }

    /// `cargo test --release -p waybill --lib loader::btf::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark; run in release mode"]
    fn bench_parse_vmlinux() {
        if real_btf().is_none() {
            return;
        }
        let mut times = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let btf = Btf::from_sys_fs().unwrap();
            let parsed = t.elapsed();
            kernel_offsets(&btf).unwrap();
            times.push((t.elapsed(), parsed));
        }
        times.sort();
        let (total, parsed) = times[times.len() / 2];
        eprintln!("median over 20: read+parse {parsed:?}, read+parse+kernel_offsets {total:?}; min {:?}", times[0].0);
    }
}
