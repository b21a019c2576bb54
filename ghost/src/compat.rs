//! Host requirements: what an image records about the exporting host and the checks an import
//! makes against the local host before it creates anything.

use crate::error::{GhostError, Result};
use crate::image::{Requirements, VdsoPart};
use crate::procfs::MapLine;

/// CPU flags programs (glibc's ifuncs, compilers' dispatch) select code paths by; a restored
/// process that picked AVX-512 code must find AVX-512 again.
const ISA_FLAGS: &[&str] = &[
    "sse3",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "popcnt",
    "aes",
    "pclmulqdq",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi1",
    "bmi2",
    "lzcnt",
    "movbe",
    "erms",
    "fsrm",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512ifma",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "avx512_bf16",
    "avx512_fp16",
    "sha_ni",
    "vaes",
    "vpclmulqdq",
    "gfni",
    "adx",
    "rdseed",
    "rdrand",
    "amx_tile",
];

/// Offset of `xfeatures` in the software-reserved bytes of the XSAVE area the kernel returns.
const SW_XFEATURES_OFF: usize = 464 + 8;

pub(crate) fn xfeatures_of(xstate: &[u8]) -> u64 {
    xstate
        .get(SW_XFEATURES_OFF..SW_XFEATURES_OFF + 8)
        .map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
        .unwrap_or(0)
}

fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let line = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let all: Vec<&str> = line
        .split_once(':')
        .map(|x| x.1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ISA_FLAGS
        .iter()
        .filter(|f| all.contains(f))
        .map(|f| f.to_string())
        .collect()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The vvar/vvar_vclock/vdso parts of a maps listing, in address order.
pub(crate) fn vdso_parts(maps: &[MapLine]) -> Vec<&MapLine> {
    maps.iter()
        .filter(|m| matches!(m.path.as_str(), "[vvar]" | "[vvar_vclock]" | "[vdso]"))
        .collect()
}

/// Requirements of an image taken on this host. `xstate` is the target's XSAVE area,
/// `vdso_text` the contents of its [vdso].
pub(crate) fn requirements(xstate: &[u8], maps: &[MapLine], vdso_text: &[u8]) -> Requirements {
    Requirements {
        arch: std::env::consts::ARCH.to_string(),
        kernel_release: kernel_release(),
        xfeatures: xfeatures_of(xstate),
        xstate_size: xstate.len() as u32,
        cpu_flags: cpu_flags(),
        vdso_parts: vdso_parts(maps)
            .iter()
            .map(|m| VdsoPart {
                name: m.path.clone(),
                size: m.end - m.start,
            })
            .collect(),
        vdso_hash: blake3::hash(vdso_text).as_bytes().to_vec(),
    }
}

/// Refuses an image this host cannot run. `local_xstate` is an XSAVE area read from a process
/// on this host (its size and feature mask are what the kernel will accept back).
pub(crate) fn check(
    req: &Requirements,
    local_xstate_size: usize,
    local_xfeatures: u64,
) -> Result<()> {
    if req.arch != std::env::consts::ARCH {
        return Err(GhostError::Incompatible(format!(
            "image is for {}, this host is {}",
            req.arch,
            std::env::consts::ARCH
        )));
    }
    if req.xfeatures & !local_xfeatures != 0 || req.xstate_size as usize != local_xstate_size {
        return Err(GhostError::Incompatible(format!(
            "the image needs XSAVE features {:#x} in a {}-byte area, this CPU/kernel offers {:#x} in {} bytes: restore on a node with the same CPU type",
            req.xfeatures, req.xstate_size, local_xfeatures, local_xstate_size
        )));
    }
    let here = cpu_flags();
    let missing: Vec<&String> = req.cpu_flags.iter().filter(|f| !here.contains(f)).collect();
    if !missing.is_empty() {
        return Err(GhostError::Incompatible(format!(
            "this CPU lacks {missing:?}, which the process may be using: restore on a node with the same CPU type"
        )));
    }
    let self_maps = crate::procfs::maps(std::process::id() as i32)?;
    let parts = vdso_parts(&self_maps);
    let sizes: Vec<(String, u64)> = parts
        .iter()
        .map(|m| (m.path.clone(), m.end - m.start))
        .collect();
    let want: Vec<(String, u64)> = req
        .vdso_parts
        .iter()
        .map(|p| (p.name.clone(), p.size))
        .collect();
    if sizes != want {
        return Err(GhostError::Incompatible(format!(
            "vDSO layout differs (image {want:?}, here {sizes:?}; image taken on kernel {}): restore on a node running the same kernel",
            req.kernel_release
        )));
    }
    if let Some(v) = parts.iter().find(|m| m.path == "[vdso]") {
        // Our own vDSO is mapped readable in our address space.
        // SAFETY: the range comes from our own /proc/self/maps and is readable ([vdso] is r-x).
        let text =
            unsafe { std::slice::from_raw_parts(v.start as *const u8, (v.end - v.start) as usize) };
        if blake3::hash(text).as_bytes().as_slice() != req.vdso_hash.as_slice() {
            return Err(GhostError::Incompatible(format!(
                "the vDSO code differs from the one of kernel {} the image was taken on: restore on a node running the same kernel",
                req.kernel_release
            )));
        }
    }
    Ok(())
}
