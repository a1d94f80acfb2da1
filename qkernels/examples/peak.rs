fn main() {
    println!("{:?}", qkernels::peak::measure());
}
