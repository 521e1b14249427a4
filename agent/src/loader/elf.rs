//! Where to put the TLS uprobes in an ELF file: OpenSSL's `SSL_*` functions (in libssl or linked
//! into an executable) and Go's `crypto/tls.(*Conn).Read/Write` with the RET instructions of their
//! machine code. Files are read through `object`'s `ReadCache`: only the headers, symbol tables
//! and the few function bodies asked for are read, never the whole file.

use std::{fs::File, path::Path};

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ReadCache, ReadRef};

/// OpenSSL functions Waybill probes, and whether each needs a return probe.
pub const SSL_FUNCS: &[&str] = &["SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex", "SSL_free"];

/// Go functions Waybill probes.
pub const GO_READ: &str = "crypto/tls.(*Conn).Read";
pub const GO_WRITE: &str = "crypto/tls.(*Conn).Write";

/// Oldest Go with the register ABI on amd64 (arguments in RAX, RBX, …; g in R14).
pub const GO_MIN: (u32, u32) = (1, 17);
/// Newest Go whose `tls.Conn` → `net.TCPConn` → `netFD` → `poll.FD.Sysfd` layout and calling
/// convention were checked against its sources (run-tested here: Debian's 1.19). A newer Go is
/// refused with a message rather than probed on a guess.
pub const GO_MAX: (u32, u32) = (1, 24);

/// A probe location: function name and file offset (what the kernel's uprobe wants).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub func: String,
    pub offset: u64,
}

/// What a file offers for TLS probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsTargets {
    /// OpenSSL functions found (entry offsets).
    pub openssl: Vec<Location>,
    /// Go: version string from the build info (e.g. "go1.19.8").
    pub go_version: Option<String>,
    /// Go: entries of Read/Write and the RET instructions of each.
    pub go_entries: Vec<Location>,
    pub go_rets: Vec<Location>,
    /// The file has a symbol table at all (false: stripped, nothing can be found by name).
    pub has_symbols: bool,
    /// Why Go probes cannot be used although this is a Go program.
    pub go_problem: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot open {0}: {1}")]
    Open(String, std::io::Error),
    #[error("{0} is not an ELF file waybill can read: {1}")]
    Parse(String, object::Error),
}

/// Converts a virtual address to a file offset through the loadable segments.
fn file_offset<'a, O: Object<'a>>(obj: &O, addr: u64) -> Option<u64> {
    obj.segments().find_map(|s| {
        let (foff, fsize) = s.file_range();
        let start = s.address();
        (addr >= start && addr < start + fsize).then(|| addr - start + foff)
    })
}

/// Reads `len` bytes at virtual address `addr`.
fn read_vaddr<'a, O: Object<'a>, R: ReadRef<'a>>(obj: &O, data: R, addr: u64, len: u64) -> Option<&'a [u8]> {
    let off = file_offset(obj, addr)?;
    data.read_bytes_at(off, len).ok()
}

/// Scans `path` for TLS functions. `want_openssl`: look for the `SSL_*` symbols (libssl, or an
/// executable that may link OpenSSL statically); Go build info is always looked for in
/// executables.
pub fn scan(path: &Path, want_openssl: bool) -> Result<TlsTargets, ElfError> {
    let f = File::open(path).map_err(|e| ElfError::Open(path.display().to_string(), e))?;
    let cache = ReadCache::new(f);
    let obj = object::File::parse(&cache).map_err(|e| ElfError::Parse(path.display().to_string(), e))?;
    let mut out = TlsTargets::default();
    let dynsyms = obj.dynamic_symbols().count();
    let syms = obj.symbols().count();
    out.has_symbols = dynsyms + syms > 0;

    if want_openssl {
        // Exported functions are in .dynsym (libssl, and node exports OpenSSL for addons); fall back
        // to .symtab for executables that link it without exporting.
        for pass in 0..2 {
            let iter: Box<dyn Iterator<Item = _>> =
                if pass == 0 { Box::new(obj.dynamic_symbols()) } else { Box::new(obj.symbols()) };
            for s in iter {
                if !s.is_definition() || s.kind() != object::SymbolKind::Text {
                    continue;
                }
                let Ok(name) = s.name() else { continue };
                if !SSL_FUNCS.contains(&name) || out.openssl.iter().any(|l| l.func == name) {
                    continue;
                }
                if let Some(offset) = file_offset(&obj, s.address()) {
                    out.openssl.push(Location { func: name.to_string(), offset });
                }
            }
            if !out.openssl.is_empty() {
                break;
            }
        }
    }

    if let Some(sec) = obj.section_by_name(".go.buildinfo") {
        if let Ok(data) = sec.data() {
            out.go_version = go_version(&obj, &cache, data);
        }
        scan_go(&obj, &cache, &mut out);
    }
    Ok(out)
}

/// The Go version from a `.go.buildinfo` section: "\xff Go buildinf:", pointer size, flags; with
/// flag 2 (Go ≥ 1.18) the version follows inline as a varint-prefixed string at 32, otherwise
/// (Go ≤ 1.17) a pointer at 16 leads to a Go string header.
pub fn go_version<'a, O: Object<'a>, R: ReadRef<'a>>(obj: &O, data: R, sec: &[u8]) -> Option<String> {
    if sec.len() < 32 || &sec[..14] != b"\xff Go buildinf:" {
        return None;
    }
    let ptr_size = sec[14] as usize;
    let flags = sec[15];
    if flags & 2 != 0 {
        let (len, n) = uvarint(&sec[32..])?;
        let start = 32 + n;
        let s = sec.get(start..start + len as usize)?;
        return Some(String::from_utf8_lossy(s).into_owned());
    }
    if ptr_size != 8 {
        return None;
    }
    let ptr = u64::from_le_bytes(sec[16..24].try_into().ok()?);
    let hdr = read_vaddr(obj, data, ptr, 16)?;
    let sptr = u64::from_le_bytes(hdr[..8].try_into().ok()?);
    let slen = u64::from_le_bytes(hdr[8..16].try_into().ok()?);
    if slen > 64 {
        return None;
    }
    let s = read_vaddr(obj, data, sptr, slen)?;
    Some(String::from_utf8_lossy(s).into_owned())
}

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= ((byte & 0x7f) as u64) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// "go1.19.8" → (1, 19).
pub fn parse_go_version(v: &str) -> Option<(u32, u32)> {
    let rest = v.strip_prefix("go")?;
    let mut it = rest.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

fn scan_go<'a, O: Object<'a>, R: ReadRef<'a>>(obj: &O, data: R, out: &mut TlsTargets) {
    if obj.architecture() != object::Architecture::X86_64 {
        out.go_problem = Some(format!("Go TLS probes support x86_64 only, not {:?}", obj.architecture()));
        return;
    }
    match out.go_version.as_deref().and_then(parse_go_version) {
        Some(v) if (GO_MIN..=GO_MAX).contains(&v) => {}
        Some(v) => {
            let why = if v < GO_MIN { "predates the register ABI" } else { "is newer than the versions Waybill knows" };
            out.go_problem = Some(format!(
                "{} {why} (supported: Go {}.{} to {}.{}): TLS in it will not be seen",
                out.go_version.as_deref().unwrap_or("?"),
                GO_MIN.0,
                GO_MIN.1,
                GO_MAX.0,
                GO_MAX.1
            ));
            return;
        }
        None => {
            out.go_problem = Some("the Go version could not be read from .go.buildinfo".into());
            return;
        }
    }
    let mut found = 0;
    for s in obj.symbols() {
        let Ok(name) = s.name() else { continue };
        if name != GO_READ && name != GO_WRITE {
            continue;
        }
        found += 1;
        let (addr, size) = (s.address(), s.size());
        let (Some(off), Some(code)) = (file_offset(obj, addr), read_vaddr(obj, data, addr, size)) else {
            continue;
        };
        out.go_entries.push(Location { func: name.to_string(), offset: off });
        for ret in ret_offsets(code, addr) {
            out.go_rets.push(Location { func: name.to_string(), offset: off + (ret - addr) });
        }
        if found == 2 {
            break;
        }
    }
    if out.go_entries.is_empty() {
        out.go_problem = Some(if obj.symbols().next().is_none() {
            "the Go binary is stripped (no .symtab, e.g. built with -ldflags=-s): crypto/tls cannot be found, TLS in it \
             will not be seen"
                .into()
        } else {
            "the program does not use crypto/tls".into()
        });
    } else if out.go_rets.is_empty() {
        out.go_problem = Some("no RET instruction found in crypto/tls.(*Conn).Read/Write".into());
    }
}

/// Addresses of the RET instructions in `code` (x86_64 machine code loaded at `addr`), found by
/// decoding instruction by instruction (a 0xC3 byte inside another instruction is not a RET).
pub fn ret_offsets(code: &[u8], addr: u64) -> Vec<u64> {
    let mut d = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut out = Vec::new();
    for ins in &mut d {
        if ins.is_invalid() {
            // Padding (INT3) or data: keep going, the decoder resynchronises on the next byte.
            continue;
        }
        if ins.mnemonic() == Mnemonic::Ret {
            out.push(ins.ip());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ret_inside_an_immediate_is_not_a_ret() {
        // mov eax, 0xc3c3c3c3 ; ret ; int3 ; add rsp, 0x18 ; ret
        let code = [0xb8, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xcc, 0x48, 0x83, 0xc4, 0x18, 0xc3];
        assert_eq!(ret_offsets(&code, 0x1000), vec![0x1005, 0x100b]);
    }

    #[test]
    fn go_versions() {
        assert_eq!(parse_go_version("go1.19.8"), Some((1, 19)));
        assert_eq!(parse_go_version("go1.21rc2"), Some((1, 21)));
        assert_eq!(parse_go_version("devel"), None);
        assert_eq!(uvarint(&[0x96, 0x01]), Some((150, 2)));
    }

    #[test]
    fn finds_ssl_functions_in_the_system_libssl() {
        let p = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        if !p.exists() {
            return;
        }
        let t = scan(p, true).unwrap();
        for f in ["SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex"] {
            assert!(t.openssl.iter().any(|l| l.func == f), "{f} missing: {t:?}");
        }
        assert!(t.go_version.is_none());
    }
}
