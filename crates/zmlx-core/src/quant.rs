pub struct QuantSpec; pub struct QuantizedMatrix;
