//! The guest image (kernel and initramfs), built from Debian packages once and cached, because a
//! fresh CI machine can reach apt but no image registry, and a build costs seconds every test
//! would otherwise pay.
//!
//! The kernel is Debian's cloud kernel (small, boots in seconds under TCG), downloaded with
//! `apt-get download` and unpacked with `dpkg -x`, never installed on the host. Its virtio drivers
//! are modules, so the initramfs carries them (decompressed: busybox `insmod` may not read
//! `.ko.xz` or `.ko.zst`) and the init loads them in passes, since their order differs between
//! kernel builds. Builds run in a private temp dir under a lock file and are renamed into place,
//! so concurrent tests build once and never see half an image.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use super::{Error, create_dir, io_error, run_command, unique_id};

/// The busybox binary put into the guest (package busybox-static).
pub(super) const BUSYBOX: &str = "/bin/busybox";

/// The metapackage whose dependency names the current cloud kernel image package.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// The virtio modules the guest needs, in a plausible order (the init retries in passes).
const MODULES: [&str; 9] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
];

/// Bump when the image's layout changes in a way the init script's text does not show.
const FORMAT: &str = "vmgov-guest-image-1";

/// The guest's `/init`. `@MODULES@` becomes the modules that are not built into the kernel.
const INIT: &str = r#"#!/bin/sh
# /init of vmgov's test guests (built by tests/src/guest/image.rs).
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
say() { echo "vmgov-guest: $*"; }

modules="@MODULES@"
pass=0
while [ -n "$modules" ] && [ "$pass" -lt 10 ]; do
  pass=$((pass + 1))
  left=""
  for m in $modules; do
    insmod "/lib/modules/$m.ko" 2>/dev/null || left="$left $m"
  done
  modules="$left"
done
[ -n "$modules" ] && say "could not load modules:$modules"

addr=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in vmgov.ip=*) addr="${arg#vmgov.ip=}" ;; esac
done
n=0
while { [ ! -e /sys/class/net/eth0 ] || [ ! -b /dev/vda ]; } && [ "$n" -lt 300 ]; do
  sleep 0.1
  n=$((n + 1))
done
ip link set lo up
ip addr add "$addr" dev eth0
ip link set eth0 up
httpd -p 80 -h /www

# The command shell: raw and without echo, so the host reads exactly what commands print.
# stderr is not a tty, so sh is not interactive: no prompts.
stty -F /dev/ttyS1 raw -echo
say "ready ip=$addr"
while true; do
  sh </dev/ttyS1 >/dev/ttyS1 2>/dev/null
  stty -F /dev/ttyS1 raw -echo
done
"#;

/// What httpd serves as `/index.html`.
const INDEX_HTML: &str = "<html><body>vmgov test guest</body></html>\n";

/// A prepared guest image in the cache.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The initramfs, an uncompressed newc cpio (`-initrd`).
    pub initramfs: PathBuf,
    /// The Debian package the kernel came from, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub kernel_package: String,
}

impl GuestImage {
    /// Returns the cached image, building it first if needed (downloads the kernel package with
    /// apt, so needs Debian's repositories and `apt-get update` done once). Safe to call from
    /// several tests and processes at once.
    pub fn prepare() -> Result<Self, Error> {
        let cache = cache_dir();
        create_dir(&cache)?;
        let dir = cache.join(format!("image-{:016x}", fnv1a(&[FORMAT, INIT, INDEX_HTML])));
        if let Ok(image) = Self::load(&dir) {
            return Ok(image);
        }
        let lock_path = cache.join("prepare.lock");
        let lock = fs::File::create(&lock_path)
            .and_then(|f| f.lock().map(|()| f))
            .map_err(|source| io_error("locking", &lock_path, source))?;
        if let Ok(image) = Self::load(&dir) {
            return Ok(image);
        }
        // We hold the lock, so any other temp dir is left over from a killed build.
        remove_temp_dirs(&cache);
        let tmp = cache.join(format!("tmp-{}", unique_id()));
        let built = build(&tmp).and_then(|out| {
            fs::rename(&out, &dir).map_err(|source| io_error("renaming into place", &out, source))
        });
        let _ = fs::remove_dir_all(&tmp);
        drop(lock);
        built?;
        Self::load(&dir)
    }

    fn load(dir: &Path) -> Result<Self, Error> {
        let package_file = dir.join("kernel-package");
        let kernel_package = fs::read_to_string(&package_file)
            .map_err(|source| io_error("reading", &package_file, source))?
            .trim()
            .to_owned();
        Ok(Self {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio"),
            kernel_package,
        })
    }
}

/// The harness's cache and scratch directory: `vmgov-guest/` in cargo's target dir
/// (`CARGO_TARGET_DIR` if set, else the workspace's `target/`).
pub fn cache_dir() -> PathBuf {
    let root = crate::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    target.join("vmgov-guest")
}

/// Builds an image in `tmp` and returns the directory to rename into place.
fn build(tmp: &Path) -> Result<PathBuf, Error> {
    create_dir(tmp)?;
    let download = || -> Result<String, Error> {
        let package = kernel_package()?;
        run_command(Command::new("apt-get").args(["download", "-q", &package]).current_dir(tmp))?;
        Ok(package)
    };
    // Lists that are missing or stale (the kernel was superseded on the mirror) are refreshed
    // once; the harness runs as root, like everything that boots guests.
    let package = match download() {
        Ok(package) => package,
        Err(_) => {
            run_command(Command::new("apt-get").args(["update", "-qq"]))?;
            download()?
        }
    };
    let deb = find_files(tmp, &|p| p.extension().is_some_and(|e| e == "deb"))
        .into_iter()
        .next()
        .ok_or_else(|| Error::Image(format!("apt-get download {package} left no .deb")))?;
    let unpacked = tmp.join("pkg");
    run_command(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;

    let out = tmp.join("image");
    create_dir(&out)?;
    let kernel = find_files(&unpacked.join("boot"), &|p| file_name(p).starts_with("vmlinuz-"))
        .into_iter()
        .next()
        .ok_or_else(|| Error::Image(format!("{package} has no /boot/vmlinuz-*")))?;
    copy(&kernel, &out.join("vmlinuz"))?;

    let root = tmp.join("root");
    for dir in
        ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "www", "lib/modules"]
    {
        create_dir(&root.join(dir))?;
    }
    check_static(Path::new(BUSYBOX))?;
    copy(Path::new(BUSYBOX), &root.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", root.join("bin/sh"))
        .map_err(|source| io_error("linking", &root.join("bin/sh"), source))?;
    let modules = copy_modules(&unpacked, &root.join("lib/modules"))?;
    write(&root.join("init"), &INIT.replace("@MODULES@", &modules.join(" ")))?;
    set_executable(&root.join("init"))?;
    write(&root.join("www/index.html"), INDEX_HTML)?;

    let initramfs = out.join("initramfs.cpio");
    run_command(
        Command::new("sh")
            .args(["-c", "find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 -F \"$1\"", "sh"])
            .arg(&initramfs)
            .current_dir(&root),
    )?;
    write(&out.join("kernel-package"), &format!("{package}\n"))?;
    Ok(out)
}

/// The versioned kernel image package the cloud metapackage depends on.
fn kernel_package() -> Result<String, Error> {
    let out = run_command(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .ok_or_else(|| {
            Error::Image(format!(
                "`apt-cache depends {KERNEL_METAPACKAGE}` names no kernel image package (has \
                 `apt-get update` run?): {text}"
            ))
        })
}

/// Copies the wanted modules (decompressed) into `dest` and returns those the init must load;
/// modules built into the kernel are skipped, missing ones are an error.
fn copy_modules(unpacked: &Path, dest: &Path) -> Result<Vec<String>, Error> {
    let base = unpacked.join("lib/modules");
    let version = find_dirs(&base).into_iter().next().ok_or_else(|| {
        Error::Image(format!("no kernel version directory in {}", base.display()))
    })?;
    let files = find_files(&version, &|p| file_name(p).contains(".ko"));
    let builtin = fs::read_to_string(version.join("modules.builtin")).unwrap_or_default();
    let mut to_load = Vec::new();
    for module in MODULES {
        let found = files.iter().find(|p| {
            let name = file_name(p);
            ["", ".xz", ".zst", ".gz"].iter().any(|ext| name == format!("{module}.ko{ext}"))
        });
        let target = dest.join(format!("{module}.ko"));
        match found {
            Some(path) => {
                decompress(path, &target)?;
                to_load.push(module.to_owned());
            }
            None if builtin.lines().any(|l| file_name(Path::new(l)) == format!("{module}.ko")) => {}
            None => {
                return Err(Error::Image(format!(
                    "module {module} is neither in {} nor built in",
                    version.display()
                )));
            }
        }
    }
    Ok(to_load)
}

fn decompress(src: &Path, dest: &Path) -> Result<(), Error> {
    let tool = match src.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return copy(src, dest),
    };
    let file = fs::File::create(dest).map_err(|source| io_error("creating", dest, source))?;
    run_command(Command::new(tool).arg("-dc").arg(src).stdout(Stdio::from(file)))?;
    Ok(())
}

/// Refuses a dynamically linked busybox (package `busybox` instead of `busybox-static`): it
/// would not run in the initramfs, and the guest would panic with a less helpful message.
fn check_static(path: &Path) -> Result<(), Error> {
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(1 << 16).read_to_end(&mut bytes))
        .map_err(|source| io_error("reading", path, source))?;
    if has_interpreter(&bytes) {
        Err(Error::Image(format!(
            "{} is dynamically linked; install busybox-static",
            path.display()
        )))
    } else {
        Ok(())
    }
}

/// Whether a 64-bit little-endian ELF has a `PT_INTERP` program header (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at =
        |o: usize| elf.get(o..o + 2).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .and_then(|v| usize::try_from(v).ok())
    };
    let (Some(phoff), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..count).any(|i| {
        let at = phoff.saturating_add(i.saturating_mul(size));
        at.checked_add(4).and_then(|end| elf.get(at..end)) == Some(&3u32.to_le_bytes()[..])
    })
}

fn remove_temp_dirs(cache: &Path) {
    for dir in find_dirs(cache) {
        if file_name(&dir).starts_with("tmp-") {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Files under `dir` (recursively) that match.
fn find_files(dir: &Path, wanted: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if wanted(&path) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The directories directly in `dir`, sorted.
fn find_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn copy(src: &Path, dest: &Path) -> Result<(), Error> {
    fs::copy(src, dest).map(drop).map_err(|source| io_error("copying", src, source))
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    fs::write(path, text).map_err(|source| io_error("writing", path, source))
}

fn set_executable(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|source| io_error("chmod", path, source))
}

/// FNV-1a over the parts: a cache key that is stable across Rust releases.
fn fnv1a(parts: &[&str]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.bytes().chain([0]))
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_busybox_check_reads_elf_headers() {
        assert!(!has_interpreter(b""));
        assert!(!has_interpreter(&[0xff; 100]));
        // The test binary itself is dynamically linked.
        let exe = std::env::current_exe().unwrap();
        assert!(has_interpreter(&fs::read(exe).unwrap()));
    }

    #[test]
    fn cache_key_changes_with_the_init() {
        assert_ne!(fnv1a(&["a", "bc"]), fnv1a(&["ab", "c"]));
        assert_eq!(fnv1a(&[FORMAT, INIT]), fnv1a(&[FORMAT, INIT]));
    }
}
