/* The 8-lane functions torch bundles (SLEEF), handed over from Python (kernels/native.py) once the
 * library loads: the MoE's GELU and the router's and attention's soft-caps and softmax then compute
 * what torch computes, 8 lanes at a time. */
void groklm_set_tanh8(vec8_fn f) { tanh8 = f; }
void groklm_set_erf8(vec8_fn f) { erf8 = f; }
void groklm_set_exp8(vec8_fn f) { exp8 = f; }
