# CUDA source -> host C++ for the emulator: kernel launches become emu_launch calls,
# the rcp.approx asm becomes a division.
import re, sys
src = open(sys.argv[1]).read()
src = re.sub(r'asm\("rcp\.approx\.ftz\.f32 %0, %1;" : "=f"\((\w+)\) : "f"\((\w+)\)\);', r'\1 = 1.0f / \2;', src)
out, i = [], 0
while True:
    k = src.find('<<<', i)
    if k < 0:
        out.append(src[i:]); break
    # kernel name: identifier with optional template args, scanning backwards
    j = k
    if src[j-1] == '>':
        depth = 0
        while True:
            j -= 1
            if src[j] == '>': depth += 1
            elif src[j] == '<':
                depth -= 1
                if depth == 0: break
    while j > 0 and (src[j-1].isalnum() or src[j-1] == '_'): j -= 1
    name = src[j:k]
    e = src.find('>>>', k)
    cfg = src[k+3:e]
    parts = [p.strip() for p in cfg.split(',')]
    # args in balanced parens
    a0 = e + 3
    assert src[a0] == '(', src[a0:a0+20]
    depth, a = 0, a0
    while True:
        if src[a] == '(': depth += 1
        elif src[a] == ')':
            depth -= 1
            if depth == 0: break
        a += 1
    args = src[a0+1:a]
    out.append(src[i:j])
    out.append('emu_launch(dim3(%s), dim3(%s), [&] { %s(%s); })' % (parts[0], parts[1], name, args))
    i = a + 1
sys.stdout.write(''.join(out))
