fn main() {
    println!("baseguard: under construction");
}
