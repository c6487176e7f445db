package android.widget;

public class TextView extends android.view.View {
    public CharSequence getText() { throw new RuntimeException("stub"); }
    public final void setText(CharSequence text) { throw new RuntimeException("stub"); }
    public final void setText(int resid) { throw new RuntimeException("stub"); }
    public final void append(CharSequence text) { throw new RuntimeException("stub"); }
}
