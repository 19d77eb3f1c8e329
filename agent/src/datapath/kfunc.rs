//! Kernel function (kfunc) calls in the kernel object.
//!
//! A Rust BPF program calls a kfunc (here `bpf_sock_destroy`) through an `extern "C"` function.
//! bpf-linker leaves each such call as a BPF-to-BPF call instruction relocated against an
//! undefined symbol, and aya 0.14 has no support for kfuncs. Before the object is loaded, this
//! module turns each of those instructions into what the kernel expects of a kfunc call:
//! `src_reg` set to `BPF_PSEUDO_KFUNC_CALL` and the immediate set to the function's BTF id in the
//! running kernel's BTF (`/sys/kernel/btf/vmlinux`). aya then leaves the instruction alone (it is
//! no longer a BPF-to-BPF call, and its relocation names no section), and the verifier checks the
//! call against the kernel's own declaration.
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

/// `BPF_PSEUDO_KFUNC_CALL`: the call's immediate is a BTF id of a kernel function.
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
/// `BPF_JMP | BPF_CALL`.
const BPF_CALL_OPCODE: u8 = 0x85;
const INSTRUCTION_SIZE: usize = 8;

/// Why an object's kfunc calls could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum KfuncError {
    #[error("the kernel object is not a readable ELF file: {0}")]
    Elf(#[from] object::Error),
    #[error("kfunc {name}: the running kernel does not have it ({source}); it needs Linux 6.5 or later")]
    Unknown { name: String, source: aya::BtfError },
    #[error("kfunc {name}: relocation at {offset:#x} in {section} is not on a call instruction")]
    NotACall { name: String, section: String, offset: u64 },
}

/// The places in `elf` where kfunc `name` is called: (file offset of the instruction, section).
pub fn call_sites(elf: &[u8], name: &str) -> Result<Vec<(usize, String)>, KfuncError> {
    let file = object::File::parse(elf)?;
    let Some(symbol) = file.symbols().find(|s| s.name() == Ok(name) && s.is_undefined()) else {
        return Ok(Vec::new());
    };
    let mut sites = Vec::new();
    for section in file.sections() {
        let Some((file_offset, _)) = section.file_range() else {
            continue;
        };
        for (offset, relocation) in section.relocations() {
            if relocation.target() != RelocationTarget::Symbol(symbol.index()) {
                continue;
            }
            let at = file_offset as usize + offset as usize;
            let section_name = section.name().unwrap_or("?").to_string();
            if elf.get(at) != Some(&BPF_CALL_OPCODE) || at + INSTRUCTION_SIZE > elf.len() {
                return Err(KfuncError::NotACall {
                    name: name.into(),
                    section: section_name,
                    offset,
                });
            }
            sites.push((at, section_name));
        }
    }
    Ok(sites)
}

/// Rewrites every call of kfunc `name` in `elf` into a kfunc call of `btf_id` (pure). Returns
/// how many it rewrote.
pub fn resolve(elf: &mut [u8], name: &str, btf_id: u32) -> Result<usize, KfuncError> {
    let sites = call_sites(elf, name)?;
    for (at, _) in &sites {
        let instruction = &mut elf[*at..*at + INSTRUCTION_SIZE];
        // Byte 1: src_reg in the high nibble, dst_reg (0 for calls) in the low one.
        instruction[1] = BPF_PSEUDO_KFUNC_CALL << 4;
        // Bytes 2-3: the BTF object's fd index; 0 is the kernel's own BTF.
        instruction[2..4].copy_from_slice(&0i16.to_le_bytes());
        instruction[4..8].copy_from_slice(&(btf_id as i32).to_le_bytes());
    }
    Ok(sites.len())
}

/// `elf` with every call of `names` resolved against `btf`, the running kernel's.
pub fn resolve_all(elf: &[u8], names: &[&str], btf: &aya::Btf) -> Result<Vec<u8>, KfuncError> {
    let mut patched = elf.to_vec();
    for name in names {
        if call_sites(&patched, name)?.is_empty() {
            continue;
        }
        let id = btf
            .id_by_type_name_kind(name, aya_obj::btf::BtfKind::Func)
            .map_err(|source| KfuncError::Unknown {
                name: (*name).to_string(),
                source,
            })?;
        resolve(&mut patched, name, id)?;
    }
    Ok(patched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_objects_kfunc_calls_become_kfunc_calls_and_nothing_else_changes() {
        let original = super::super::object();
        let sites = call_sites(original, ferrynet_common::SOCK_DESTROY_KFUNC).unwrap();
        let sections: Vec<&str> = sites.iter().map(|(_, s)| s.as_str()).collect();
        assert!(
            sections.contains(&"iter/udp") && sections.contains(&"iter/tcp"),
            "{sections:?}"
        );
        let mut patched = original.to_vec();
        assert_eq!(
            resolve(&mut patched, ferrynet_common::SOCK_DESTROY_KFUNC, 4242).unwrap(),
            sites.len()
        );
        for (at, _) in &sites {
            assert_eq!(patched[*at], BPF_CALL_OPCODE);
            assert_eq!(patched[*at + 1] >> 4, BPF_PSEUDO_KFUNC_CALL);
            assert_eq!(i32::from_le_bytes(patched[*at + 4..*at + 8].try_into().unwrap()), 4242);
        }
        let changed = original.iter().zip(&patched).filter(|(a, b)| a != b).count();
        assert!(changed <= sites.len() * 7, "{changed} bytes changed");
        // An object without such calls is left as it is.
        assert_eq!(resolve(&mut patched, "no_such_kfunc", 1).unwrap(), 0);
    }
}
