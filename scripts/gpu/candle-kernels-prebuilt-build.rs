// Offline build for a machine without nvcc: PTX and libmoe.a were compiled by nvcc 13.0
// (sm_90a) on the GPU machine; see scripts/gpu/build_offline.sh.
use std::{env, fs, path::PathBuf};
fn main() {
    let pre = PathBuf::from(env::var("CANDLE_PREBUILT").expect("CANDLE_PREBUILT"));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let mut rs = String::new();
    for n in ["affine","binary","cast","conv","fill","indexing","quantized","reduce","sort","ternary","unary"] {
        fs::copy(pre.join("ptx").join(format!("{n}.ptx")), out.join(format!("{n}.ptx"))).unwrap();
        rs += &format!("pub const {}: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/{n}.ptx\"));\n", n.to_uppercase());
    }
    fs::write(out.join("ptx.rs"), rs).unwrap();
    println!("cargo:rustc-link-search={}", pre.join("moe").display());
    println!("cargo:rustc-link-search={}", pre.display());
    println!("cargo:rustc-link-lib=static=moe");
    println!("cargo:rustc-link-lib=dylib=cudart");
    println!("cargo:rustc-link-lib=stdc++");
    println!("cargo:rerun-if-env-changed=CANDLE_PREBUILT");
}
