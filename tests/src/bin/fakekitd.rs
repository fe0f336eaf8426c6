//! fakekitd: the stand-in build daemon; see `berth_tests::fakekitd`.

fn main() {
    berth_tests::fakekitd::main()
}
