//! Compiles the public contract in `proto/` into Rust (tonic + prost) with a vendored protoc,
//! and writes a file descriptor set for server reflection. No system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["proto/modserve/v1/modserve.proto"];
    tonic_prost_build::configure().file_descriptor_set_path(out.join("modserve_descriptor.bin")).compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
